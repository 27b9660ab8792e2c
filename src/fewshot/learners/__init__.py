"""Learners: an algorithm around a backbone, behind one interface (`FewShotLearner`).

    backbone = create_backbone("conv4", in_channels=1, image_size=28)
    learner = create_learner("protonet", backbone)
    out = learner.compute(list_of_episodes)        # out.terms["loss"]: the trainer steps on it
    logits = learner.predict(episode)             # or learner.fit(sx, sy, n_way)(qx)

The registry is an explicit dict; nothing registers itself on import.
"""

from __future__ import annotations

from collections.abc import Mapping

from fewshot.backbones.base import Backbone
from fewshot.errors import ConfigError
from fewshot.learners.base import Deployment, FewShotLearner, LearnerOutput
from fewshot.learners.maml import ANIL, FOMAML, MAML, MetaSGD
from fewshot.learners.pretrain import Pretrain
from fewshot.learners.protonet import ProtoNet
from fewshot.learners.reptile import Reptile

_REGISTRY: dict[str, type[FewShotLearner]] = {
    cls.name: cls for cls in (ProtoNet, MAML, FOMAML, ANIL, MetaSGD, Reptile, Pretrain)
}


def list_learners() -> list[str]:
    return sorted(_REGISTRY)


def learner_class(name: str) -> type[FewShotLearner]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown learner {name!r}; valid learners: {', '.join(list_learners())}")
    return _REGISTRY[name]


def create_learner(name: str, backbone: Backbone, **kwargs: object) -> FewShotLearner:
    """Build a learner by name around `backbone`. Unknown names and arguments raise ConfigError."""
    return learner_class(name)(backbone, **kwargs)


def learner_from_config(config: Mapping[str, object], backbone: Backbone) -> FewShotLearner:
    """Rebuild a learner from its `config` dict (as stored in manifests) around `backbone`."""
    cfg = dict(config)
    name = cfg.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"learner config {config!r} needs a 'name' string; produce it with FewShotLearner.config")
    return create_learner(name, backbone, **cfg)


__all__ = [
    "ANIL",
    "Deployment",
    "LearnerOutput",
    "FOMAML",
    "MAML",
    "FewShotLearner",
    "MetaSGD",
    "Pretrain",
    "ProtoNet",
    "Reptile",
    "create_learner",
    "learner_class",
    "learner_from_config",
    "list_learners",
]
