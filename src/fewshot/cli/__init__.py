"""The `fewshot` command: thin commands over the library API (`commands`) and their argument
table (`parser`)."""

from __future__ import annotations

from fewshot.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
