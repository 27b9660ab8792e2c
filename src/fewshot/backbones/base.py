"""The backbone contract: images (N, C, H, W) float in [0, 1] -> embeddings (N, embedding_dim).

Every backbone is a `Backbone`: an `nn.Module` that also says how wide its embeddings are
(`embedding_dim`) and how to build it again (`config`: `{"name": ..., **arguments}`, what
`fewshot.backbones.backbone_from_config` takes), so checkpoints, bundles and teachers read both
as typed attributes instead of probing an `nn.Module`.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class Backbone(nn.Module):
    """Base class of every backbone; subclasses set both attributes in `__init__`."""

    embedding_dim: int  # D of the (N, D) embeddings `forward` returns
    config: dict[str, Any]  # the exact arguments that rebuild it, with "name"
