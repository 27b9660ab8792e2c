"""From a trained run to a served bundle, measured as served.

* `deployable_backbone`: the embedder a learner is served with. ProtoNet and pre-training use the
  backbone in eval mode. The MAML family and Reptile ran batch norm on support-set statistics,
  so their running statistics were never trained: they are re-estimated here as the average of
  support-set statistics over `export.bn_episodes` training episodes of the evaluation shape
  (the statistics the model saw in training), on training classes only.
* `choose_rule`: the learner's decision rule; for gradient-based learners (whose own rule is an
  inner loop the service does not run) the prototype metric that scores best on validation
  episodes is chosen and recorded.
* `fewshot.artifacts.served_choice`: the example views and the probe's C the bundle serves, chosen
  on validation episodes (`export.views`, `export.probe_c`), and `evaluate_embedder`, the
  protocol's episodes through the service's path.
* `export_run`: writes the bundle and refuses it when the bundle as served is more than
  `export.max_drop` below the learner's own accuracy on the same episodes (unless forced); with
  `int8`, it then quantises the bundle on training images (`fewshot.artifacts.quantise`) and
  serves the int8 model, refused when it loses more than 1 point against fp32 (unless forced).
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fewshot.artifacts.bundle import export_bundle
from fewshot.artifacts.calibration import calibrate_open_set
from fewshot.artifacts.domain import summarise_domain
from fewshot.artifacts.embedders import MemoEmbed, TorchEmbedder
from fewshot.artifacts.embedding_summary import min_training_images
from fewshot.artifacts.image_stats import model_image_statistics, upload_statistics
from fewshot.artifacts.quantise import (
    QuantiseConfig,
    calibration_sample,
    check_calibration_images,
    quantise_bundle,
)
from fewshot.artifacts.served_choice import choose_probe_c, choose_views, evaluate_embedder
from fewshot.backbones.base import Backbone
from fewshot.config import RunConfig, load_config
from fewshot.config.sections import ExportConfig
from fewshot.decision import METRICS, DecisionRule
from fewshot.episodes.loader import EpisodeDataset
from fewshot.episodes.sampling import EpisodeSpec
from fewshot.errors import CheckpointError, FewshotError
from fewshot.precision import in_memory_format
from fewshot.training.data import RunData, images_by_class, load_run_data, source_of
from fewshot.training.evaluate import EvalResult
from fewshot.training.protocol import load_results
from fewshot.training.runs import check_run_dir, load_trained

BN_SEED_OFFSET, RULE_SEED_OFFSET, INT8_SEED_OFFSET = 200_003, 300_007, 400_009


class ExportRefused(CheckpointError):
    """The bundle as served is worse than the learner it came from."""


def _plain_copy(backbone: Backbone) -> Backbone:
    """A float32, CPU, contiguous-memory copy (training may have used bf16 / channels-last)."""
    model = copy.deepcopy(backbone).float().cpu()
    return in_memory_format(model, torch.contiguous_format)


@torch.no_grad()
def reestimate_batch_norm(backbone: Backbone, data: RunData, spec: EpisodeSpec, *, episodes: int,
                          seed: int) -> Backbone:
    """A float32 eval-mode copy of `backbone` whose batch-norm running statistics are the mean of
    the statistics of `episodes` training support sets (cumulative average, momentum=None)."""
    model = _plain_copy(backbone)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    stream = EpisodeDataset(data.cache, data.pool("train"), spec, seed=seed + BN_SEED_OFFSET)
    for i in range(episodes):
        model(stream[i].support_x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def deployable_backbone(learner: Any, data: RunData, config: RunConfig) -> Backbone:
    """The backbone as it will be served: float32, contiguous, eval mode (see module doc)."""
    ev = config.eval
    if learner.deployment.embedder == "bn-reestimated":
        return reestimate_batch_norm(learner.backbone, data, EpisodeSpec(ev.way, ev.shot, 1),  # support sets only
                                     episodes=config.export.bn_episodes, seed=config.seed)
    return _plain_copy(learner.backbone).eval()


def choose_rule(learner: Any, backbone: Backbone, data: RunData, config: RunConfig) -> tuple[DecisionRule, dict[str, float]]:
    """The learner's rule; for gradient-based learners the better prototype metric on validation."""
    rule: DecisionRule = learner.deployment.rule
    if learner.deployment.embedder != "bn-reestimated" or "val" not in data.splits:
        return rule, {}

    pre = data.cache.preprocessing
    emb = TorchEmbedder(backbone, pre).embed
    ev = config.eval
    scores: dict[str, float] = {m: evaluate_embedder(emb, DecisionRule("prototype", m), data, split="val", way=ev.way, shot=ev.shot,
                                   query=ev.query, episodes=200, seed=config.seed + RULE_SEED_OFFSET).mean
              for m in METRICS}
    best = max(METRICS, key=lambda m: scores[m])  # the first of equals, as before
    return DecisionRule("prototype", best), scores


def _served_rule(learner: Any, backbone: Backbone, data: RunData,
                 config: RunConfig) -> tuple[DecisionRule, dict[str, float], dict[str, Any]]:
    """The rule a bundle serves: `choose_rule`'s head with `choose_views`'s views and `choose_probe_c`'s
    C, and their reports (the deployment's `rule_val_accuracy`, `views` and `probe_c`)."""
    rule, rule_scores = choose_rule(learner, backbone, data, config)
    embed = MemoEmbed(TorchEmbedder(backbone, data.cache.preprocessing).embed)  # validation images once
    rule, view_report = choose_views(embed, rule, data, config)
    rule, c_report = choose_probe_c(embed, rule, data, config)
    return rule, rule_scores, {"views": view_report, "probe_c": c_report}


def recorded_test_results(run_dir: Path) -> list[dict[str, Any]]:
    """The run's recorded test evaluations (`fewshot evaluate`); refused when there are none."""
    results = [r for r in load_results(run_dir) if r["split"] == "test"]
    if not results:
        raise CheckpointError(f"run {run_dir} has no test evaluation; run `fewshot evaluate {run_dir}` first")
    return results


def _result_key(r: dict[str, Any]) -> str:
    return f"{r['split']}_{r['way']}w{r['shot']}s_{r['mode']}"


def _served(embed: Any, rule: DecisionRule, data: RunData, r: dict[str, Any]) -> EvalResult:
    """The episodes of recorded evaluation `r` through `embed` (an embedder's, or a `MemoEmbed` of
    it shared across evaluations) + `rule`."""
    return evaluate_embedder(embed, rule, data, split=r["split"], way=r["way"], shot=r["shot"],
                             query=r["query"], episodes=r["episodes"], seed=r["seed"], mode=r["mode"])


def served_accuracy(results: list[dict[str, Any]], data: RunData, rule: DecisionRule) -> Any:
    """embedder -> {evaluation: mean accuracy} on the episodes of each recorded test evaluation
    (the `evaluate` of `quantise_bundle`)."""

    def evaluate(embedder: Any) -> dict[str, float]:
        embed = MemoEmbed(embedder.embed)  # each test image once across the evaluations
        return {_result_key(r): _served(embed, rule, data, r).mean for r in results}

    return evaluate


def _served_metrics(results: list[dict[str, Any]], data: RunData, rule: DecisionRule, max_drop: float,
                    force: bool) -> Any:
    """The `evaluate` callback of `export_bundle`: the ONNX model + rule on every evaluation the
    run has (same episodes), compared with the learner's accuracy; raises ExportRefused."""

    def evaluate(onnx_embedder: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        worst = None
        embed = MemoEmbed(onnx_embedder.embed)  # each test image once across the evaluations
        for r in results:
            served = _served(embed, rule, data, r)
            key = _result_key(r)
            drop = r["mean"] - served.mean
            out[key] = {"mean": r["mean"], "ci95": r["ci95"], "episodes": r["episodes"], "seed": r["seed"],
                        "served_mean": served.mean, "served_ci95": served.ci95, "drop": drop}
            worst = (key, drop) if worst is None or drop > worst[1] else worst
        assert worst is not None
        if worst[1] > max_drop and not force:
            raise ExportRefused(
                f"the bundle as served (ONNX Runtime + {rule.rule}/{rule.metric}) scores "
                f"{100 * out[worst[0]]['served_mean']:.2f}% on {worst[0]}, {100 * worst[1]:.2f} points below the "
                f"learner's {100 * out[worst[0]]['mean']:.2f}% (limit {100 * max_drop:.2f}); nothing was written. "
                "Fix the deployment, or pass --force to write it anyway (the manifest records the drop)")
        return out

    return evaluate


def _open_set(embedder: Any, by_class: dict[str, np.ndarray], config: RunConfig, seed: int,
              rule: DecisionRule) -> dict[str, Any]:
    """Open-set rules at 95% of correct answers kept / 80% of unknowns rejected, on `by_class`
    (taught through the rule's example views)."""
    smallest = min(len(v) for v in by_class.values())
    n_shot = max(1, min(5, smallest - 1))
    return calibrate_open_set(
        embedder, by_class, np.random.default_rng(seed),
        n_way=max(2, min(5, len(by_class) - 1)), n_shot=n_shot, n_query=max(1, min(15, smallest - n_shot)),
        n_episodes=config.export.calibration_episodes, views=(rule.views, rule.view_shift),
    ).to_dict()


def int8_calibration_images(data: RunData, n: int, seed: int) -> np.ndarray:
    """uint8 (n, C, H, W): `n` training-split images spread over the training classes, chosen by
    `seed` (only the chosen images are read from the cache)."""
    train = {data.cache.classes[c].name: data.cache.class_images(c)
             for c in dict.fromkeys(int(i) for i in data.splits["train"].class_ids)}
    return calibration_sample(train, n, np.random.default_rng(seed + INT8_SEED_OFFSET))


@dataclass(frozen=True)
class Int8Export:
    """`export_run(..., int8=Int8Export())`: quantise the bundle (fewshot.artifacts.quantise) on
    `calibration_images` training images and serve the int8 model."""
    quantise: QuantiseConfig = QuantiseConfig()
    calibration_images: int = 256


def export_run(run_dir: Path, out: Path, *, data: RunData | None = None, seed: int = 0, force: bool = False,
               int8: Int8Export | None = None, export: ExportConfig | None = None) -> Path:
    """Bundle the best checkpoint of a run: weights, manifest, ONNX (parity-checked), calibration,
    and the accuracy of the bundle as served beside the learner's (refused if it drops too much).

    The unknown-class rules (`fewshot.decision.OpenSetRule`) are calibrated on the validation split
    (never on test classes). With `int8`, the bundle also holds the int8 model and serves it,
    after the int8 and fp32 models were measured on the run's test episodes (`quantise_bundle`:
    refused when int8 loses more than `int8.quantise.max_drop`, unless `force`); its open-set rules
    are re-calibrated on the int8 embeddings. `export`: settings instead of the run's (a zoo recipe's).
    """
    if out.exists():
        raise CheckpointError(f"{out} already exists; choose a new bundle folder or delete it")
    saved = load_config(check_run_dir(run_dir) / "config.yaml")
    config = saved if export is None else saved.model_copy(update={"export": export})
    data = data or load_run_data(config.data, progress=False)
    pre = data.cache.preprocessing
    results = recorded_test_results(run_dir)
    int8_images = None
    if int8 is not None:  # too few images: refused before the costly export
        int8_images = int8_calibration_images(data, int8.calibration_images, seed)
        check_calibration_images(int8_images, pre, min_images=int8.quantise.min_images,
                                 requested=int8.calibration_images)
    learner, manifest = load_trained(run_dir)
    backbone = deployable_backbone(learner, data, config)
    rule, rule_scores, choices = _served_rule(learner, backbone, data, config)
    calib_split = "val" if "val" in data.splits else "test"  # all its images: the threshold moves with the classes seen
    by_class = images_by_class(data, calib_split)
    calibration = _open_set(TorchEmbedder(backbone, pre), by_class, config, seed, rule)
    deployment = {"embedder": learner.deployment.embedder, "rule": rule.to_dict(), "rule_val_accuracy": rule_scores,
                  **choices, "learner": manifest["model"]["learner"]["name"]}
    if learner.deployment.embedder == "bn-reestimated":
        deployment["batch_norm"] = (f"running statistics = mean of {config.export.bn_episodes} training support "
                                    f"sets ({config.eval.way}-way {config.eval.shot}-shot)")
    sample = np.concatenate([v[:2] for v in list(by_class.values())[:16]])
    domain = domain_summary(config, data, TorchEmbedder(backbone, pre), seed)
    if domain is None:
        deployment["domain"] = "no summary: too few training images; out-of-domain images are not flagged"
    target = out if int8 is None else out.parent / f".{out.name}.fp32-{os.getpid()}"
    bundle = export_bundle(
        backbone, target, preprocessing=pre,
        source={"run": str(run_dir), "name": config.name, "learner": manifest["model"]["learner"],
                "step": manifest["step"], "calibrated_on": f"{data.scheme}/{calib_split}",
                "train_classes": data.class_names("train"),
                # the data section (without local paths): `fewshot evaluate BUNDLE` prepares the same data
                "data": config.data.model_dump(mode="json", exclude={"root", "cache_dir"})},
        metrics={}, data_fingerprint=data.cache.fingerprint, calibration=calibration,
        sample_images=sample, deployment=deployment, domain=None if domain is None else domain.to_dict(),
        evaluate=_served_metrics(results, data, rule, config.export.max_drop, force),
    )
    if int8 is None or int8_images is None:
        return bundle
    try:
        return quantise_bundle(
            bundle, int8_images, served_accuracy(results, data, rule), out_dir=out, config=int8.quantise,
            force=force, requested=int8.calibration_images,
            calibrated_on=f"{len(int8_images)} {data.scheme}/train images (seed {seed})",
            recalibrate=lambda embedder: _open_set(embedder, by_class, config, seed, rule))
    finally:
        shutil.rmtree(bundle, ignore_errors=True)


def domain_summary(config: RunConfig, data: RunData, embedder: Any, seed: int, *, n_originals: int = 3000,
                   n_embedded: int = 8000) -> Any | None:
    """What the bundle knows of its training domain (`fewshot.artifacts.domain`): statistics of
    `n_originals` training files as a user would upload them (read from the raw source; the
    packed model inputs when the source cannot be read) and the embedding distribution of about
    `n_embedded` training images, the same number from each class, its threshold cross-fitted by
    class (every image scored by a projection fitted without its class). The service flags uploads
    far outside it. None when the training split is too small to calibrate a threshold."""
    rng = np.random.default_rng(seed)
    classes = list(dict.fromkeys(int(c) for c in data.splits["train"].class_ids))
    per_class = max(1, -(-n_embedded // len(classes)))
    parts = [np.asarray(data.cache.class_images(c)[:per_class]) for c in classes]
    train = np.concatenate(parts)
    groups = np.repeat(np.arange(len(parts)), [len(p) for p in parts])  # (N,) class of each image
    if len(train) < min_training_images():
        return None  # too few to calibrate a threshold: the bundle flags nothing (recorded in deployment)
    pre = data.cache.preprocessing
    names = set(data.class_names("train"))
    stats, origin = [], "originals"
    try:
        source = source_of(config.data)
        entries = [e for e in source.entries() if e.class_name in names]
        picked = rng.choice(len(entries), size=min(n_originals, len(entries)), replace=False)
        stats = [upload_statistics(source.read(entries[i]), name=entries[i].source_id) for i in picked]
    except (OSError, FewshotError):
        stats = []
    if not stats:  # the raw files are gone or renamed: the packed (already converted) images
        stats, origin = model_image_statistics(train[rng.permutation(len(train))[:n_originals]]), "model inputs"
    return summarise_domain(embedder, train, stats, mode=pre.mode, size=pre.size, rng=rng,
                            trained_on=f"{config.data.dataset} training images", image_stats_from=origin,
                            groups=groups)
