"""What a resume may change: the config fields that do not change what a run computes."""

from __future__ import annotations

from typing import Any

# Fields a resume may change: they do not change what the run computes (the data fingerprint is
# checked separately, and the step stream does not depend on them).
RESUMABLE = {
    "data": {"root", "cache_dir"},
    "train": {"steps", "num_workers", "device", "max_seconds", "val_every", "val_episodes", "val_way",
              "val_shot", "val_query", "val_domain_mode", "checkpoint_every"},
}
CONFIG_SECTIONS = ("data", "model", "train", "seed", "distill")


def _resumable(section: str, key: str, saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """A cosine schedule is laid over `train.steps`: changing it changes every later learning rate,
    so under cosine the budget is fixed for the whole run."""
    if section == "train" and key == "steps":
        return "cosine" not in (saved.get("train", {}).get("schedule"), current.get("train", {}).get("schedule"))
    return key in RESUMABLE.get(section, set())


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields that differ, ignoring the ones a resume may change (RESUMABLE)."""
    diffs = []
    for section in CONFIG_SECTIONS:
        a, b = saved.get(section), current.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if not _resumable(section, k, saved, current) and a.get(k) != b.get(k):
                    diffs.append(f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif a != b:
            diffs.append(f"{section}: {a!r} -> {b!r}")
    return diffs
