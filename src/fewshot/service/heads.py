"""The service's names for the decision's heads, and numpy scores for its neighbour search.

A workspace's `head` is "prototype" (nearest prototype) or "logistic" (the L2-normalised
logistic-regression probe, refitted on the workspace's stored examples); the served decision
(`fewshot.decision.ServedDecision`) calls the latter "probe". Everything that decides goes through
`fewshot.decision.decide`.

The matrix products run in torch, whose thread count the service pins (`serve` sets 1): numpy's
OpenBLAS threads contend with ONNX Runtime and request threads on small machines.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from fewshot.decision import Head, Metric
from fewshot.decision import prototype_scores as _scores

ServiceHead = Literal["prototype", "logistic"]
SERVICE_HEADS: tuple[ServiceHead, ...] = ("prototype", "logistic")


def head_of(head: ServiceHead) -> Head:
    """A workspace's head name -> the decision's ("logistic" is the probe)."""
    return "probe" if head == "logistic" else "prototype"


def service_head(head: Head) -> ServiceHead:
    """The decision's head name -> a workspace's."""
    return "logistic" if head == "probe" else "prototype"


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def prototype_scores(q: np.ndarray, protos: np.ndarray, metric: Metric, proto_sq: np.ndarray | None = None) -> np.ndarray:
    """(N, D) queries vs (K, D) stored vectors -> (N, K): squared distances or cosine similarities."""
    sq = None if proto_sq is None else _t(proto_sq)
    return _scores(_t(q), _t(protos), metric, sq).numpy()
