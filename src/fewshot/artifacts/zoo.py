"""The model zoo: trained bundles committed with their model cards, served by name.

An entry is a folder `zoo/<name>/` holding
  bundle/         the exported bundle (weights, manifest, ONNX), served like any other
  card.json       the card as data: recipe and every command, segments and CPU-hours, data and
                  licence, the protocol, and the accuracy table as served beside the published anchors
  episodes.json   per-episode accuracies as served behind every number of the table
  MODEL.md        the card for people, rendered from card.json (never typed by hand)
  curves.png      the training curves of the run that made it

`zoo:NAME` (or `NAME` where a command expects a zoo name) is accepted wherever a bundle folder is:
`fewshot serve zoo:omniglot-protonet-conv4`, `fewshot evaluate zoo:omniglot-protonet-conv4`,
distillation teachers, `fewshot export-workspace`. The zoo folder is `$FEWSHOT_ZOO`, else the `zoo/`
folder of the checkout this package runs from.

This module only finds, reads and renders entries; `fewshot.workflows.zoo` makes and re-scores them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewshot.errors import ConfigError

PREFIX = "zoo:"
CARD, EPISODES, MODEL_MD, BUNDLE_DIR, CURVES = "card.json", "episodes.json", "MODEL.md", "bundle", "curves.png"


def zoo_root() -> Path:
    """`$FEWSHOT_ZOO`, else `zoo/` beside `src/` of the checkout this package is imported from."""
    env = os.environ.get("FEWSHOT_ZOO")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3] / "zoo"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    path: Path

    @property
    def bundle(self) -> Path:
        return self.path / BUNDLE_DIR

    def card(self) -> dict[str, Any]:
        card: dict[str, Any] = json.loads((self.path / CARD).read_text(encoding="utf-8"))
        return card

    def episodes(self) -> dict[str, list[float]]:
        """Setting key ("5w1s") -> per-episode accuracies as served, in episode order."""
        out: dict[str, list[float]] = json.loads((self.path / EPISODES).read_text(encoding="utf-8"))
        return out


def list_entries(root: Path | None = None) -> list[ZooEntry]:
    """The entries (folders with a card and a bundle), by name."""
    root = zoo_root() if root is None else Path(root)
    if not root.is_dir():
        return []
    return [ZooEntry(p.name, p) for p in sorted(root.iterdir())
            if p.is_dir() and (p / CARD).is_file() and (p / BUNDLE_DIR / "manifest.json").is_file()]


def get_entry(name: str, root: Path | None = None) -> ZooEntry:
    """The entry called `name` (with or without `zoo:`), or an error listing the ones that exist."""
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    entries = list_entries(root)
    for e in entries:
        if e.name == name:
            return e
    where = zoo_root() if root is None else root
    known = ", ".join(e.name for e in entries) or "none"
    raise ConfigError(f"no zoo entry {name[:80]!r} in {where} (entries: {known}); `fewshot zoo` lists them, "
                      "and FEWSHOT_ZOO points at another zoo folder")


def is_zoo_name(spec: str | os.PathLike[str]) -> bool:
    return str(spec).startswith(PREFIX)


def resolve_bundle(spec: str | os.PathLike[str]) -> Path:
    """A bundle folder from `zoo:NAME` or a path (returned as given)."""
    return get_entry(str(spec)).bundle if is_zoo_name(spec) else Path(spec)


def setting_key(way: int, shot: int, mode: str = "any") -> str:
    return f"{way}w{shot}s" + ("" if mode == "any" else f"-{mode}")


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def headline(card: dict[str, Any]) -> str:
    """One line of the card's results: `5w1s 98.1 +- 0.2 | ...`."""
    return " | ".join(f"{r['key']} {100 * r['mean']:.2f} +- {100 * r['ci95']:.2f}" for r in card["results"])


def render_model_md(card: dict[str, Any]) -> str:
    """MODEL.md from card.json: every number here is read from the card."""
    p, t, d = card["protocol"], card["training"], card["data"]
    head = card["results"][0]  # the headline task: the command scores it
    mode = "" if head.get("mode", "any") == "any" else f" --mode {head['mode']}"
    lines = [f"# {card['name']}: {card['title']}", "", card["summary"], "",
             f"Serve it: `fewshot serve zoo:{card['name']}`. Score it as served: "
             f"`fewshot evaluate zoo:{card['name']} --way {head['way']} --shot {head['shot']}{mode}` (any way / shot on the "
             "card's protocol).", "",
             "## Accuracy as served", "",
             f"Protocol: {p['description']}. Split `{d['split']}`, {p['split']} classes (never trained on), "
             f"{p['episodes']} episodes per setting from seed {p['seed']}, {p['query']} queries per class, "
             "mean +- 95% confidence interval (1.96 x standard error). Scored as served: "
             f"{p['served']}.", "",
             "| task | as served | learner (PyTorch, support images alone) | published | source | at least the published? |",
             "|---|---:|---:|---:|---|---|"]
    for r in card["results"]:
        pub = r.get("published")
        met = "—" if pub is None else ("**yes**" if 100 * r["mean"] >= pub else "**no** (miss)")
        task = f"{r['way']}-way {r['shot']}-shot" + ("" if r["mode"] == "any" else f" {r['mode']}")
        lines.append(f"| {task} | {_pct(r['mean'])} +- {_pct(r['ci95'])} | {_pct(r.get('learner_mean'))} | "
                     f"{'—' if pub is None else f'{pub:.2f}'} | {r.get('source') or '—'} | {met} |")
    m = card["model"]
    lines += ["", "## Model", "",
              f"- backbone `{m['backbone']}` ({m['parameters']:,} parameters, {m['embedding_dim']}-d embeddings), "
              f"learner `{m['learner']}`, decision rule {m['rule']}",
              f"- ONNX {m['onnx_mb']:.2f} MB; bundle id `{m['bundle_id'][:16]}`",
              f"- input: {m['input']}", "",
              "## Training", "",
              f"- recipe: `{t['recipe']}` (resolved config in `card.json`); run folder `{t['run']}`",
              f"- {t['steps']:,} steps of {t['episode']}; checkpoint kept: step {t['best_step']:,} "
              f"(best validation accuracy {_pct(t['best_val_acc'])}% on {t['validation']})",
              *([f"- {t['distillation']}"] if t.get("distillation") else []),
              f"- {t['train_hours']:.2f} h of training, **{t['cpu_hours']:.2f} CPU core-hours**, on {t['machine']}",
              "", "Segments (each stretch of work, resumed exactly from the previous one's checkpoint):", "",
              "| # | steps | hours | threads | commit | torch | started (UTC) | command |",
              "|---|---|---:|---:|---|---|---|---|"]
    for s in t["segments"]:
        lines.append(f"| {s['index']} | {s['start_step']:,}-{s['end_step']:,} | {s['train_seconds'] / 3600:.2f} | "
                     f"{s.get('threads', '?')} | `{str(s.get('commit') or '?')[:12]}` | {s.get('torch', '?')} | "
                     f"{s.get('started_at', '?')} | `{s.get('command', '')}` |")
    mk = card["made"]
    lines += ["", "Made by:", "", "```bash", *mk["commands"], "```", "",
              f"Published {mk['date']} from commit `{str(mk['commit'])[:12]}` with torch {mk['torch']} on {mk['machine']}.",
              "", "## Data", "",
              f"{d['description']} Licence: {d['licence']}. Cache fingerprint `{d['fingerprint'][:16]}`.", "",
              "## Intended use and limits", "", card["intended_use"], "", card["limitations"], "",
              "![training curves](curves.png)", ""]
    return "\n".join(lines)
