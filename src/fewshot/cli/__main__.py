"""`python -m fewshot.cli ...`, as the `fewshot` command."""

from __future__ import annotations

import sys

from fewshot.cli.parser import main

if __name__ == "__main__":
    sys.exit(main())
