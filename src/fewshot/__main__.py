"""`python -m fewshot ...` (and `torchrun --nproc-per-node N -m fewshot train CONFIG`)."""

import sys

from fewshot.cli import main

if __name__ == "__main__":
    sys.exit(main())
