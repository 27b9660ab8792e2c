"""The materialised episode: the tensors every learner consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Episode:
    """An N-way K-shot Q-query task as tensors.

    support_x: (n_way * n_shot, C, H, W) float32 in [0, 1]
    support_y: (n_way * n_shot,) int64 labels in 0..n_way-1
    query_x:   (n_way * n_query, C, H, W)
    query_y:   (n_way * n_query,)
    class_ids: (n_way,) int64 cache class ids (for per-domain breakdowns)
    rotations: (n_way,) int64 quarter turns applied to each class
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    class_ids: torch.Tensor
    rotations: torch.Tensor

    @property
    def n_way(self) -> int:
        return int(self.class_ids.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episode:
        return Episode(
            self.support_x.to(device, non_blocking=non_blocking),
            self.support_y.to(device, non_blocking=non_blocking),
            self.query_x.to(device, non_blocking=non_blocking),
            self.query_y.to(device, non_blocking=non_blocking),
            self.class_ids,
            self.rotations,
        )
