"""`fewshot evaluate`: the protocol applied to trained runs, and the results it records
(`fewshot compare` reads them: `fewshot.workflows.compare`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fewshot.config import load_config
from fewshot.episodes.sampling import DomainMode, EpisodeSpec
from fewshot.errors import EpisodeError
from fewshot.io import atomic_write_json
from fewshot.precision import select_precision
from fewshot.training.data import RunData, load_run_data
from fewshot.training.evaluate import EvalResult, evaluate_episodes
from fewshot.training.runs import check_run_dir, load_trained, resolve_device, train_classes


def check_no_training_classes(run_dir: Path, data: RunData, split: str) -> None:
    """Refuse to evaluate on any class (character) the run trained on, whatever its rotation."""
    seen = train_classes(run_dir)
    overlap = sorted(seen & set(data.class_names(split)))
    if overlap:
        raise EpisodeError(
            f"split {split!r} shares {len(overlap)} classes with the run's training classes "
            f"(e.g. {overlap[:3]}); evaluating on trained classes is refused. Use the test split of the "
            "scheme the run was trained with"
        )


def evaluate_run(
    run_dir: str | Path,
    *,
    way: int,
    shot: int,
    query: int = 15,
    episodes: int = 1000,
    seed: int = 1234,
    split: str = "test",
    mode: DomainMode = "any",
    device: str = "auto",
    data: RunData | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate the best checkpoint of a run and write `eval-<split>-<way>w<shot>s-<mode>.json`."""
    run_dir = check_run_dir(Path(run_dir))
    config = load_config(run_dir / "config.yaml")
    data = data or load_run_data(config.data, progress=progress)
    check_no_training_classes(run_dir, data, split)

    dev = resolve_device(device)
    learner, manifest = load_trained(run_dir, device=str(dev))
    if manifest["data"]["fingerprint"] != data.cache.fingerprint:
        raise EpisodeError(
            f"run {run_dir} was trained on data with fingerprint {manifest['data']['fingerprint'][:12]} "
            f"but the current cache has {data.cache.fingerprint[:12]}; the class split may differ"
        )

    learner.set_precision(select_precision(dev, prefer=config.train.precision))
    result = evaluate_episodes(
        learner.predict, data.cache, data.pool(split), EpisodeSpec(way, shot, query),
        episodes=episodes, seed=seed, mode=mode, device=dev, progress=progress,
    )
    out = run_dir / f"eval-{split}-{way}w{shot}s-{mode}.json"
    atomic_write_json(out, {"run": config.name, "learner": config.model.learner,
                            "backbone": config.model.backbone, "split_scheme": data.scheme,
                            "split": split, **result.to_dict()})
    return result


def load_results(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(Path(run_dir).glob("eval-*.json"))]
