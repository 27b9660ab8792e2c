"""metrics.csv of a run folder, kept across resumes."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

BASE_FIELDS = ["step", "lr", "elapsed_s", "val_acc", "val_ci95"]


class MetricsLog:
    """metrics.csv in the run folder: step, lr, time, validation, and every term the learner (and
    the distillation objective) returns. On resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self.fields: list[str] | None = None
        rows: list[dict[str, str]] = []
        if resume_step > 0 and path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                self.fields = list(reader.fieldnames or []) or None
                rows = [r for r in reader if int(r["step"]) <= resume_step]
        path.unlink(missing_ok=True)
        if self.fields is not None:
            self._write("w", rows)

    def _write(self, mode: str, rows: list[dict[str, Any]]) -> None:
        assert self.fields is not None
        with open(self.path, mode, newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, self.fields, extrasaction="ignore")
            if mode == "w":
                w.writeheader()
            w.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        if self.fields is None:
            self.fields = BASE_FIELDS[:3] + [k for k in row if k not in BASE_FIELDS] + BASE_FIELDS[3:]
            self._write("w", [])
        self._write("a", [{k: row.get(k, "") for k in self.fields}])
