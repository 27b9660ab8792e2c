"""Making and checking zoo entries (`fewshot zoo publish | rescore`, `fewshot evaluate zoo:NAME`).

`publish` turns a zoo recipe's trained run into an entry: the protocol's test evaluations of the
learner, the bundle exported from its best checkpoint (refused if it serves more than
`export.max_drop` below the learner), the bundle scored *as served* (ONNX Runtime + the bundle's
decision rule: `fewshot.artifacts.export.evaluate_embedder`) on every setting of the card, and the card
(card.json, per-episode accuracies, MODEL.md rendered from them, the training curves). The entry is
built beside its place and swapped in only when complete: a failed publish leaves the committed
entry as it was.

`score` is the one function behind the card's numbers, `fewshot evaluate zoo:NAME` and the tests
that re-score committed entries.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot.artifacts.bundle import Bundle, load_bundle
from fewshot.artifacts.embedders import MemoEmbed
from fewshot.artifacts.export import evaluate_embedder, export_run
from fewshot.artifacts.zoo import (
    BUNDLE_DIR,
    CARD,
    CURVES,
    EPISODES,
    MODEL_MD,
    ZooEntry,
    get_entry,
    render_model_md,
    setting_key,
    zoo_root,
)
from fewshot.config import DataConfig, RunConfig, ZooConfig, config_from_dict, load_config
from fewshot.episodes.sampling import DomainMode
from fewshot.errors import CheckpointError, ConfigError, EpisodeError
from fewshot.io import atomic_write_json, atomic_write_text, replace_dir
from fewshot.training.checkpoint import read_manifest
from fewshot.training.data import RunData, load_run_data
from fewshot.training.evaluate import EvalResult, mean_ci95
from fewshot.training.loop import learner_data_kind
from fewshot.training.protocol import evaluate_run
from fewshot.training.resume import config_differences
from fewshot.training.segments import SegmentLog, code_commit, cpu_hours, cpu_model

SERVED = "ONNX Runtime on uint8 images (the service's preprocessing) + the bundle's decision rule"


def card_config(entry: ZooEntry) -> RunConfig:
    """The recipe an entry was made from, as recorded in its card."""
    return config_from_dict(entry.card()["recipe"]["config"], f"{entry.path / CARD}")


def check_bundle_data(bundle: Bundle, data: RunData, split: str) -> None:
    """The bundle was trained on this data (fingerprint) and never on a class of `split`."""
    fp = bundle.manifest.data_fingerprint
    if fp and fp != data.cache.fingerprint:
        raise EpisodeError(f"bundle {bundle.path} was made from data {fp[:12]}, the cache holds "
                           f"{data.cache.fingerprint[:12]}: the classes or images differ; prepare the data the card names")
    trained = set(bundle.manifest.source.get("train_classes") or [])
    overlap = sorted(trained & set(data.class_names(split)))
    if overlap:
        raise EpisodeError(f"split {split!r} shares {len(overlap)} classes with the bundle's training classes "
                           f"(e.g. {overlap[:3]}); scoring on trained classes is refused")


def score(bundle: Bundle, data: RunData, *, way: int, shot: int, query: int, episodes: int, seed: int,
          split: str = "test", mode: DomainMode = "any", embed: MemoEmbed | None = None) -> EvalResult:
    """The protocol's fixed-seed episodes through the bundle as served. Episode i depends only on
    (seed, i), so the first k episodes of a longer evaluation are these episodes. Each distinct
    image goes through the bundle's ONNX embedder once (`embed`: share one `MemoEmbed` of it across
    the settings of a table)."""
    check_bundle_data(bundle, data, split)
    embed = embed if embed is not None else MemoEmbed(bundle.onnx_embedder.embed)
    return evaluate_embedder(embed, bundle.decision_rule, data,
                             split=split, way=way, shot=shot, query=query, episodes=episodes, seed=seed, mode=mode)


def entry_data(entry: ZooEntry, *, root: str | None = None, cache_dir: str | None = None,
               progress: bool = False) -> RunData:
    """The data the entry's card names (`root`: the data root, default $FEWSHOT_DATA)."""
    data_cfg = card_config(entry).data
    update = {k: v for k, v in (("root", root), ("cache_dir", cache_dir)) if v is not None}
    return load_run_data(data_cfg.model_copy(update=update), progress=progress)


def evaluate_entry(name: str, *, way: int, shot: int, episodes: int | None = None, query: int | None = None,
                   seed: int | None = None, mode: DomainMode = "any", data: RunData | None = None) -> EvalResult:
    """`fewshot evaluate zoo:NAME`: any way / shot as served, on the card's protocol (split, seed,
    queries, episodes) unless given."""
    entry = get_entry(name)
    proto = entry.card()["protocol"]
    bundle = load_bundle(entry.bundle)
    data = data or entry_data(entry, progress=True)
    return score(bundle, data, way=way, shot=shot, query=query or proto["query"],
                 episodes=episodes or proto["episodes"], seed=proto["seed"] if seed is None else seed,
                 split=proto["split"], mode=mode)


def evaluate_bundle(path: str | Path, *, way: int, shot: int, episodes: int = 1000, query: int = 15, seed: int = 1234,
                    split: str = "test", mode: DomainMode = "any", data: RunData | None = None) -> EvalResult:
    """`fewshot evaluate BUNDLE`: a bundle folder scored as served on the protocol, on the data its
    manifest records (bundles exported by `fewshot export` since the zoo)."""
    bundle = load_bundle(path)
    recorded = bundle.manifest.source.get("data")
    if data is None:
        if recorded is None:
            raise ConfigError(f"bundle {path} does not record the data it was trained on (exported by an older "
                              "version, or made with bundle-onnx / the photos backbone); re-export it with "
                              "`fewshot export RUN OUT`, or evaluate its run folder")
        data = load_run_data(DataConfig.model_validate(recorded), progress=True)
    return score(bundle, data, way=way, shot=shot, query=query, episodes=episodes, seed=seed, split=split, mode=mode)


def rescore(entry: ZooEntry, data: RunData, *, episodes: int | None = None) -> list[dict[str, Any]]:
    """Re-score every setting of the card on its first `episodes` episodes (all: None) and compare
    with the per-episode accuracies recorded when it was published."""
    card, recorded = entry.card(), entry.episodes()
    proto = card["protocol"]
    bundle = load_bundle(entry.bundle)
    embed = MemoEmbed(bundle.onnx_embedder.embed)
    out: list[dict[str, Any]] = []
    done: dict[str, EvalResult] = {}
    for r in card["results"]:
        n = len(recorded[r["key"]]) if episodes is None else min(episodes, len(recorded[r["key"]]))
        if r["key"] not in done:  # a setting listed twice (two published anchors) is scored once
            done[r["key"]] = score(bundle, data, way=r["way"], shot=r["shot"], query=proto["query"], episodes=n,
                                   seed=proto["seed"], split=proto["split"], mode=r["mode"], embed=embed)
        res = done[r["key"]]
        rec = np.asarray(recorded[r["key"]][:n])
        out.append({"key": r["key"], "episodes": n, "recorded_mean": float(rec.mean()), "mean": res.mean,
                    "ci95": res.ci95, "card_mean": r["mean"], "card_ci95": r["ci95"],
                    "max_episode_diff": float(np.abs(np.asarray(res.accuracies) - rec).max())})
    return out


def _model_info(bundle: Bundle) -> dict[str, Any]:
    pre, rule = bundle.preprocessing, bundle.decision_rule
    onnx_bytes = (bundle.path / bundle.served_model).stat().st_size
    return {"backbone": bundle.manifest.backbone.get("name"), "learner": bundle.manifest.source.get("learner", {}).get("name"),
            "parameters": sum(p.numel() for p in bundle.backbone.parameters()),
            "embedding_dim": bundle.embedding_dim, "rule": f"{rule.rule} / {rule.metric}" + (f" (C = {rule.probe_c:g})" if rule.rule == "probe" else "")
            + _views_words(rule),
            "onnx_mb": onnx_bytes / 2**20, "bundle_id": bundle.bundle_id,
            "input": f"{'grayscale' if pre.mode == 'L' else 'RGB'} {pre.size}x{pre.size}"}


def _views_words(rule: Any) -> str:
    """How a taught image is embedded, in words (nothing when it is the image alone)."""
    if rule.views == "none":
        return ""
    what = {"mirror": "the image and its mirror", "shift4": f"the image and 4 copies shifted by {rule.view_shift} px",
            "shift4+mirror": f"the image, 4 copies shifted by {rule.view_shift} px and their mirrors"}[rule.views]
    return f"; each taught image is the mean embedding of {what}"


_DRAWN = {"within": "within one domain", "across": "across domains"}  # an episode's classes, by domain mode


def training_recipe(config: RunConfig) -> str:
    """What one training step saw, and the optimiser, in words (a card's "N steps of ...")."""
    tc = config.train
    if learner_data_kind(config) == "batches":
        seen = f"batches of {tc.batch_size} labelled images"
    else:
        seen = f"{tc.way}-way {tc.shot}-shot {tc.query}-query episodes (meta-batch {tc.meta_batch})"
        if tc.domain_mode in _DRAWN:
            seen += f" with classes drawn {_DRAWN[tc.domain_mode]}"
    if tc.affine:
        seen += ", affine distortions"
    return f"{seen}, {tc.optimizer} lr {tc.lr} {tc.schedule} (warm-up {tc.warmup})"


def _training_info(config: RunConfig, run_dir: Path, recipe: Path) -> dict[str, Any]:
    best = read_manifest(run_dir / "checkpoints" / "best")
    last = read_manifest(run_dir / "checkpoints" / "last")
    segments = SegmentLog.read(run_dir).segments
    if not segments:
        raise CheckpointError(f"run {run_dir} has no segments.json; zoo entries list every stretch of their training")
    tc, d = config.train, config.distill
    seconds = sum(float(s["train_seconds"]) for s in segments)
    taught = None if d is None else (
        "distilled from " + ", ".join(f"{t.path} (weight {t.weight})" for t in d.teachers)
        + f": episode-logit KD {d.kd_episode_weight} (T = {d.temperature}), base-class KD {d.kd_class_weight}, "
        f"hint {d.hint_weight}, RKD distance {d.rkd_distance_weight}, RKD angle {d.rkd_angle_weight}, "
        f"task {d.task_weight}")
    return {"recipe": str(recipe), "run": str(run_dir), "steps": int(last["step"]), "planned_steps": tc.steps,
            "best_step": int(best["step"]), "best_val_acc": best.get("metrics", {}).get("val_acc"),
            "validation": f"{tc.val_episodes} {tc.val_way}-way {tc.val_shot}-shot episodes of the val split"
                          + (f" ({_DRAWN[tc.val_domain_mode]})" if tc.val_domain_mode in _DRAWN else ""),
            "episode": training_recipe(config),
            "train_hours": seconds / 3600, "cpu_hours": sum(cpu_hours(s) for s in segments),
            "distillation": taught,
            "machine": ", ".join(sorted({f"{s.get('cpu')} ({s.get('cores')} cores)" for s in segments})),
            "segments": segments}


def _check_run_matches(config: RunConfig, run_dir: Path) -> None:
    if not (run_dir / "checkpoints" / "best" / "manifest.json").is_file():
        raise CheckpointError(f"{run_dir} has no best checkpoint; train it first: fewshot train RECIPE")
    trained = load_config(run_dir / "config.yaml")
    diffs = config_differences(trained.to_dict(), config.to_dict())
    if diffs:
        raise ConfigError(f"run {run_dir} was trained with another config than this recipe ({'; '.join(diffs)})")


def publish(recipe: str | Path, *, replace: bool = False, episodes: int | None = None, root: Path | None = None,
            data: RunData | None = None, progress: bool = True) -> ZooEntry:
    """Export, score as served and card the run of zoo recipe `recipe` into `<zoo>/<name>/`."""
    recipe = Path(recipe)
    config = load_config(recipe)
    if config.zoo is None:
        raise ConfigError(f"{recipe} has no zoo section (the card's text and results table); see configs/zoo/")
    zc = config.zoo
    root = zoo_root() if root is None else Path(root)
    dest = root / config.name
    if dest.exists() and not replace:
        raise CheckpointError(f"zoo entry {dest} exists; pass --replace to publish over it (the old entry stays "
                              "until the new one is complete)")
    run_dir = config.run_dir()
    _check_run_matches(config, run_dir)
    data = data or load_run_data(config.data, progress=progress)
    n = episodes or zc.episodes
    learner: dict[str, EvalResult] = {}
    for r in zc.results:  # a setting listed twice (two published anchors) is scored once
        key = setting_key(r.way, r.shot, r.mode)
        if key not in learner:
            learner[key] = evaluate_run(run_dir, way=r.way, shot=r.shot, query=zc.query, episodes=n, seed=zc.seed,
                                        split=zc.split, mode=r.mode, data=data, progress=progress)
    staging = root / f".{config.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        export_run(run_dir, staging / BUNDLE_DIR, data=data, seed=config.seed, export=config.export)  # the recipe's
        bundle = load_bundle(staging / BUNDLE_DIR)
        results, per_episode = _served_results(bundle, data, zc, n, learner)
        card = _card(config, zc, recipe, data, bundle, results, n, episodes)
        atomic_write_json(staging / CARD, card)
        atomic_write_json(staging / EPISODES, per_episode)
        atomic_write_text(staging / MODEL_MD, render_model_md(card))
        if (run_dir / "curves.png").is_file():
            shutil.copyfile(run_dir / "curves.png", staging / CURVES)
        replace_dir(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ZooEntry(config.name, dest)


def _served_results(bundle: Bundle, data: RunData, zc: ZooConfig, n: int, learner: dict[str, EvalResult],
                    ) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """The card's results table, scored as served on `n` episodes of each setting, and the
    per-episode accuracies behind it."""
    results, per_episode = [], {}
    embed = MemoEmbed(bundle.onnx_embedder.embed)
    for r in zc.results:
        key = setting_key(r.way, r.shot, r.mode)
        if key not in per_episode:  # a setting listed twice (two published anchors) is scored once
            res = score(bundle, data, way=r.way, shot=r.shot, query=zc.query, episodes=n, seed=zc.seed,
                        split=zc.split, mode=r.mode, embed=embed)
            per_episode[key] = [round(a, 6) for a in res.accuracies]
        mean, ci = mean_ci95(np.asarray(per_episode[key]))
        results.append({"key": key, "way": r.way, "shot": r.shot, "mode": r.mode, "mean": mean, "ci95": ci,
                        "learner_mean": learner[key].mean, "learner_ci95": learner[key].ci95,
                        "published": r.published, "source": r.source})
    return results, per_episode


def _card(config: RunConfig, zc: ZooConfig, recipe: Path, data: RunData, bundle: Bundle,
          results: list[dict[str, Any]], n: int, episodes: int | None) -> dict[str, Any]:
    """card.json of an entry: what the model is, how it was trained, and its results as served."""
    commit = code_commit()
    training = _training_info(config, config.run_dir(), recipe)
    commands = [f"{s['command']}   # segment {s['index']}" for s in training["segments"]]
    commands.append(f"fewshot zoo publish {recipe}" + ("" if episodes is None else f" --episodes {episodes}"))
    return {
        "name": config.name, "title": zc.title, "summary": " ".join(zc.summary.split()),
        "intended_use": " ".join(zc.intended_use.split()), "limitations": " ".join(zc.limitations.split()),
        "model": _model_info(bundle), "recipe": {"path": str(recipe), "config": config.to_dict()},
        "training": training,
        "data": {"dataset": config.data.dataset, "split": data.scheme, "fingerprint": data.cache.fingerprint,
                 "description": " ".join(zc.data_description.split()), "licence": zc.licence},
        "protocol": {"split": zc.split, "episodes": n, "query": zc.query, "seed": zc.seed, "served": SERVED,
                     "description": protocol_description(data.scheme, zc.split)},
        "results": results,
        "made": {"date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": commit, "torch": _torch_version(),
                 "machine": f"{cpu_model()} ({os.cpu_count()} cores)", "commands": commands},
    }


def protocol_description(scheme: str, split: str = "test") -> str:
    """The card's one-line name of the protocol its table follows, by split scheme and split."""
    if scheme == "lake" and split == "test":
        return ("Lake et al.'s one-shot protocol (N-way K-shot episodes of the 20 evaluation alphabets, never "
                "trained on; a 'within' row draws every class of an episode from one alphabet)")
    if scheme == "lake":
        return (f"Lake et al.'s split, its {split} classes (N-way K-shot episodes; a 'within' row draws every "
                "class of an episode from one alphabet)")
    return "the few-shot protocol of Vinyals et al. / Snell et al. (N-way K-shot episodes of unseen classes)"


def _torch_version() -> str:
    return str(torch.__version__)


def entry_table(entries: list[ZooEntry]) -> str:
    """`fewshot zoo`: a markdown table of the entries and their headline numbers."""
    lines = ["| entry | model | task: accuracy as served (95% CI) | CPU core-hours |", "|---|---|---|---:|"]
    for e in entries:
        card = e.card()
        res = "; ".join(f"{r['key']} {100 * r['mean']:.2f} +- {100 * r['ci95']:.2f}"
                        + ("" if r.get("published") is None else f" (paper {r['published']:.1f})")
                        for r in card["results"])
        lines.append(f"| zoo:{e.name} | {card['title']} | {res} | {card['training']['cpu_hours']:.2f} |")
    return "\n".join(lines)


class ZooMismatch(CheckpointError):
    """A committed entry's bundle no longer reproduces its card."""


def verify(entry: ZooEntry, data: RunData, *, episodes: int | None = None, tolerance: float = 0.005) -> list[dict[str, Any]]:
    """Re-score `entry` (its first `episodes` episodes per setting; all: None) and refuse any
    disagreement with its card, naming both numbers: the card's mean must be the mean of its
    recorded per-episode accuracies, and the bundle as served must reproduce those episodes'
    mean within `tolerance` (0.5 points: float summation order may flip a rare tie); on the whole
    table the re-scored mean must also lie inside the card's 95% interval."""
    card = entry.card()
    recorded = entry.episodes()
    problems = []
    for r in card["results"]:
        rec_mean = float(np.mean(recorded[r["key"]]))
        if abs(rec_mean - r["mean"]) > 1e-6:
            problems.append(f"{r['key']}: the card says {100 * r['mean']:.2f}% but its recorded episodes average "
                            f"{100 * rec_mean:.2f}%")
    rows = rescore(entry, data, episodes=episodes)
    for row in rows:
        if abs(row["mean"] - row["recorded_mean"]) > tolerance:
            problems.append(f"{row['key']}: the bundle as served scores {100 * row['mean']:.2f}% on the first "
                            f"{row['episodes']} episodes, the card recorded {100 * row['recorded_mean']:.2f}%")
        full = row["episodes"] == len(recorded[row["key"]])
        if full and abs(row["mean"] - row["card_mean"]) > row["card_ci95"]:
            problems.append(f"{row['key']}: re-scored {100 * row['mean']:.2f}% is outside the card's "
                            f"{100 * row['card_mean']:.2f} +- {100 * row['card_ci95']:.2f}")
    if problems:
        raise ZooMismatch(f"zoo entry {entry.name} ({entry.path}) does not reproduce its card: " + "; ".join(problems)
                          + ". Re-publish it (fewshot zoo publish RECIPE --replace) or restore the bundle")
    return rows
