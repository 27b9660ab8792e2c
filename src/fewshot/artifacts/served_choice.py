"""What a bundle serves, chosen on validation classes: its example views and its probe's C.

* `evaluate_embedder`: the protocol's fixed-seed episodes, run through an `Embedder` (ONNX
  Runtime, uint8 in) and a `DecisionRule`: the service's path, not the learner's.
* `choose_views`: the example views the bundle serves (`fewshot.decision.views`; `export.views`):
  with "auto", each candidate is scored on the same validation episodes as no views (the eval
  shape and domain mode, at most as many ways as there are validation classes), and of the
  candidates whose paired gain is above its 95% interval the largest gain is kept (none when no
  candidate's is); recorded in the manifest (`deployment.views`).
* `choose_probe_c`: the regularisation C a probe head serves (`export.probe_c`): None keeps the
  learner's; "auto" scores the learner's C and 2, 4 and 8 times it on the same validation
  episodes at each shot of `export.probe_c_shots` (the eval shot when empty), with the views
  already chosen, and keeps the candidate with the largest paired gain over the learner's C,
  pooled over the shots, that is above its 95% interval and significantly worse at no shot (the
  learner's C otherwise); recorded in the manifest (`deployment.probe_c`). The probe's objective
  is the mean cross-entropy + ||W||^2 / (2 C n) over its n rows (`fit_probe`): views averaged into
  one row per image leave n at the image count, so they need a larger C to weaken the prior as much
  as the same views kept as separate rows would (`benchmarks/support_views.py --probe-cs`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fewshot.artifacts.embedders import MemoEmbed
from fewshot.config import RunConfig
from fewshot.data.imageio import Preprocessing, from_model_input
from fewshot.decision import DecisionRule, default_shift, episode, example_embeddings
from fewshot.episodes.sampling import DomainMode, EpisodeSpec
from fewshot.episodes.types import Episode
from fewshot.training.data import RunData
from fewshot.training.evaluate import EvalResult, evaluate_episodes, mean_ci95

VIEWS_SEED_OFFSET, PROBE_C_SEED_OFFSET = 500_009, 600_011
PROBE_C_FACTORS = (2.0, 4.0, 8.0)


def to_uint8(x: torch.Tensor, pre: Preprocessing) -> np.ndarray:
    """Episode images (the model input under `pre`, from a uint8 cache) back to the exact uint8 pixels."""
    return from_model_input(x.detach().cpu().float().numpy(), pre)


def rule_predictor(embed: Any, rule: DecisionRule, pre: Preprocessing) -> Any:
    """episode -> (n_query, n_way) preferences whose argmax is the served label (`fewshot.decision.
    episode`: -d^2, cos or the probe's logits), through `embed` (uint8 (N, C, H, W) -> (N, D) numpy)
    and `rule` (the support images through the rule's example views, as the service teaches them);
    episodes hold the model input under `pre` (the cache's preprocessing)."""

    def predict(ep: Episode) -> torch.Tensor:
        zs = example_embeddings(embed, to_uint8(ep.support_x, pre), rule.views, rule.view_shift)
        zq = embed(to_uint8(ep.query_x, pre))
        answer = episode(rule, zs, ep.support_y.cpu().numpy(), ep.n_way, zq)
        return torch.from_numpy(answer.preference).to(ep.query_y.device)

    return predict


def evaluate_embedder(embed: Any, rule: DecisionRule, data: RunData, *, split: str, way: int, shot: int,
                      query: int, episodes: int, seed: int, mode: DomainMode = "any") -> EvalResult:
    """The protocol (same episodes as `fewshot evaluate` with the same seed) through `embed` + `rule`."""
    return evaluate_episodes(rule_predictor(embed, rule, data.cache.preprocessing), data.cache, data.pool(split), EpisodeSpec(way, shot, query),
                             episodes=episodes, seed=seed, mode=mode, progress=False,
                             enforce_protocol=False)


def view_candidates(channels: int) -> list[str]:
    """The example views `export.views: auto` tries: shifted views for every image; mirrored ones
    only for colour photos (a mirrored letter or digit can be another one)."""
    return ["none", "shift4"] + (["mirror", "shift4+mirror"] if channels == 3 else [])


def choose_views(embed: Any, rule: DecisionRule, data: RunData, config: RunConfig) -> tuple[DecisionRule, dict[str, Any]]:
    """`rule` with the example views of `config.export.views` (module doc) -> (rule, what was
    measured: per candidate the validation accuracy and the paired gain over no views)."""
    pre = data.cache.preprocessing
    shift = default_shift(pre.size)

    def with_views(v: str) -> DecisionRule:
        return replace(rule, views=v, view_shift=shift if v.startswith("shift") else 0)

    chosen = config.export.views
    if chosen != "auto":
        return with_views(chosen), {"views": chosen, "shift": with_views(chosen).view_shift, "chosen_by": "export.views"}
    shape = validation_shape(data, config, [config.eval.shot])
    if isinstance(shape, str):
        return with_views("none"), {"views": "none", "chosen_by": f"{shape}: no views"}
    way, query, mode = shape
    memo = _memo(embed)  # each validation image embedded once across candidates
    res = {v: evaluate_embedder(memo, with_views(v), data, split="val", way=way, shot=config.eval.shot, query=query,
                                episodes=config.export.view_episodes, seed=config.seed + VIEWS_SEED_OFFSET, mode=mode)
           for v in view_candidates(pre.channels)}
    base = np.asarray(res["none"].accuracies)
    report: dict[str, Any] = {"episodes": config.export.view_episodes, "way": way, "shot": config.eval.shot,
                              "query": query, "mode": mode, "shift": shift,
                              "accuracy": {v: r.mean for v, r in res.items()}, "gain": {}}
    best, best_gain = "none", 0.0
    for v, r in res.items():
        if v == "none":
            continue
        gain, ci = mean_ci95(np.asarray(r.accuracies) - base)
        report["gain"][v] = {"mean": gain, "ci95": ci}
        if gain - ci > 0 and gain > best_gain:
            best, best_gain = v, gain
    report.update(views=best, chosen_by="the largest of the paired gains above their 95% interval on validation episodes")
    return with_views(best), report


def _memo(embed: Any) -> MemoEmbed:
    """`embed` memoised, reusing the caller's memo (export shares one across both choices)."""
    return embed if isinstance(embed, MemoEmbed) else MemoEmbed(embed)


def validation_shape(data: RunData, config: RunConfig, shots: list[int]) -> tuple[int, int, DomainMode] | str:
    """(way, query, domain mode) of the validation episodes a choice is measured on: the eval shape,
    within what the validation classes hold at the largest of `shots`; or why there are none."""
    if "val" not in data.splits:
        return "no validation split"
    ev, pool = config.eval, data.pool("val")
    counts = pool.counts
    way = min(ev.way, len(counts))
    query = min(ev.query, (int(counts.min()) if len(counts) else 0) - max(shots))
    if way < 2 or query < 1:
        return "too few validation classes or images"
    # within-domain episodes when any validation domain can fill one
    fits = len(pool.domains_too_small(way, max(shots) + query)) < len(np.unique(pool.domains))
    return way, query, ev.domain_mode if fits else "any"


def choose_probe_c(embed: Any, rule: DecisionRule, data: RunData, config: RunConfig) -> tuple[DecisionRule, dict[str, Any]]:
    """`rule` with the probe C of `config.export.probe_c` (module doc) -> (rule, what was measured)."""
    setting = config.export.probe_c
    if rule.rule != "probe":
        return rule, {"chosen_by": "no probe head"}
    if setting is None:
        return rule, {"probe_c": rule.probe_c, "chosen_by": "the learner's"}
    if setting != "auto":
        return replace(rule, probe_c=float(setting)), {"probe_c": float(setting), "chosen_by": "export.probe_c"}
    shots = list(config.export.probe_c_shots) or [config.eval.shot]
    shape = validation_shape(data, config, shots)
    if isinstance(shape, str):
        return rule, {"probe_c": rule.probe_c, "chosen_by": f"{shape}: the learner's"}
    way, query, mode = shape
    memo = _memo(embed)
    cs = [rule.probe_c] + [rule.probe_c * f for f in PROBE_C_FACTORS]
    acc = {c: {s: np.asarray(evaluate_embedder(memo, replace(rule, probe_c=c), data, split="val", way=way, shot=s,
                                               query=query, episodes=config.export.view_episodes,
                                               seed=config.seed + PROBE_C_SEED_OFFSET, mode=mode).accuracies)
               for s in shots} for c in cs}
    report: dict[str, Any] = {"episodes": config.export.view_episodes, "way": way, "shots": shots, "query": query,
                              "mode": mode, "accuracy": {f"{c:g}": {str(s): float(a.mean()) for s, a in acc[c].items()}
                                                         for c in cs}, "gain": {}}
    best, best_gain = rule.probe_c, 0.0
    for c in cs[1:]:
        diffs = {s: acc[c][s] - acc[cs[0]][s] for s in shots}
        gain, ci = mean_ci95(np.concatenate(list(diffs.values())))
        by_shot = {s: mean_ci95(d) for s, d in diffs.items()}
        report["gain"][f"{c:g}"] = {"mean": gain, "ci95": ci,
                                    "by_shot": {str(s): {"mean": m, "ci95": h} for s, (m, h) in by_shot.items()}}
        worse = any(m + h < 0 for m, h in by_shot.values())
        if gain - ci > 0 and not worse and gain > best_gain:
            best, best_gain = c, gain
    report.update(probe_c=best, chosen_by="the largest paired gain over the learner's C, pooled over the shots, "
                  "above its 95% interval and significantly worse at no shot, on validation episodes")
    return replace(rule, probe_c=best), report
