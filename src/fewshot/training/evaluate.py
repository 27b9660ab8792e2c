"""The field's evaluation protocol: mean accuracy and 95% confidence interval over a fixed set
of test episodes (default 1000, at least 600), identical for every model evaluated with the same
seed, with a per-domain breakdown (accuracy over the queries of each domain's classes)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fewshot.data.cache import PackedCache
from fewshot.episodes.loader import EpisodeDataset
from fewshot.episodes.sampling import ClassPool, DomainMode, EpisodeSpec
from fewshot.episodes.types import Episode
from fewshot.errors import EpisodeError

MIN_PROTOCOL_EPISODES = 600


@dataclass(frozen=True)
class EvalResult:
    mean: float  # accuracy in [0, 1]
    ci95: float  # half-width of the 95% confidence interval, same unit
    episodes: int
    way: int
    shot: int
    query: int
    seed: int
    mode: str
    per_domain: dict[str, float] = field(default_factory=dict)
    accuracies: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        return (
            f"{self.way}-way {self.shot}-shot ({self.mode}, {self.episodes} episodes, seed {self.seed}): "
            f"{100 * self.mean:.2f}% +- {100 * self.ci95:.2f}%"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accuracies"] = [round(a, 6) for a in self.accuracies]
        return d


def mean_ci95(accuracies: np.ndarray) -> tuple[float, float]:
    """Mean and 1.96 * standard error (the convention of Snell et al. and Finn et al.)."""
    n = accuracies.size
    mean = float(accuracies.mean())
    if n < 2:
        return mean, float("nan")
    return mean, float(1.96 * accuracies.std(ddof=1) / math.sqrt(n))


def evaluate_episodes(
    predict: Callable[[Episode], torch.Tensor],
    cache: PackedCache,
    pool: ClassPool,
    spec: EpisodeSpec,
    *,
    episodes: int = 1000,
    seed: int = 1234,
    mode: DomainMode = "any",
    device: torch.device | str = "cpu",
    progress: bool = True,
    enforce_protocol: bool = True,
) -> EvalResult:
    """Run `predict` (episode -> query logits (n_query_total, n_way)) on a fixed episode stream."""
    if enforce_protocol and episodes < MIN_PROTOCOL_EPISODES:
        raise EpisodeError(
            f"the protocol needs at least {MIN_PROTOCOL_EPISODES} test episodes, got {episodes}; "
            "raise --episodes (default 1000)"
        )
    dataset = EpisodeDataset(cache, pool, spec, seed=seed, mode=mode)
    accs = np.zeros(episodes)
    dom_correct: dict[str, int] = {}
    dom_total: dict[str, int] = {}
    names = [c.domain for c in cache.classes]
    for i in tqdm(range(episodes), desc=f"eval {spec.n_way}w{spec.n_shot}s", disable=not progress, leave=False):
        ep = dataset[i].to(device)
        with torch.no_grad():
            logits = predict(ep)
        correct = (logits.argmax(-1) == ep.query_y).cpu().numpy()
        accs[i] = correct.mean()
        q_dom = [names[int(c)] for c in ep.class_ids[ep.query_y.cpu()]]
        for d, ok in zip(q_dom, correct):
            dom_correct[d] = dom_correct.get(d, 0) + int(ok)
            dom_total[d] = dom_total.get(d, 0) + 1
    mean, ci = mean_ci95(accs)
    per_domain = {d: dom_correct[d] / dom_total[d] for d in sorted(dom_total)}
    return EvalResult(mean, ci, episodes, spec.n_way, spec.n_shot, spec.n_query, seed, mode, per_domain, accs.tolist())
