"""A frozen teacher from any trained run or bundle, with its own preprocessing.

The teacher sees the student's images converted to its own input: the student's mean/std
normalisation undone (back to [0, 1] pixels), resized (bilinear, antialiased) to its side, converted
to its channels (grey -> RGB by repetition, RGB -> grey by ITU-R 601 luma), then normalised by the
teacher's own mean/std when its preprocessing has one. Its embeddings come from its deployable backbone in eval mode; its episode logits from the
served decision (`fewshot.decision.episode`) with the head its bundle is served with: a bundle's
own (with its example views, `fewshot.decision.views`), or for a run folder the head export chooses for
that run (`fewshot.artifacts.export.choose_rule`: for the MAML family and Reptile, the better prototype
metric on validation episodes; no example views); base-class logits
only from a pre-training run (its classifier), for KD on base-class logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.artifacts.bundle import load_bundle
from fewshot.artifacts.export import choose_rule, deployable_backbone
from fewshot.artifacts.manifest import WEIGHTS, sha256_file
from fewshot.artifacts.zoo import is_zoo_name, resolve_bundle
from fewshot.backbones.base import Backbone
from fewshot.config import DistillConfig, load_config
from fewshot.data.imageio import Preprocessing
from fewshot.decision import DecisionRule, episode
from fewshot.decision.views import example_embeddings_torch
from fewshot.episodes.types import Episode
from fewshot.errors import CheckpointError, ConfigError
from fewshot.precision import FP32, PrecisionPolicy, autocast_context, prepare_input, prepare_model
from fewshot.training.data import RunData
from fewshot.training.runs import load_trained, train_classes

LUMA = (0.299, 0.587, 0.114)
# a preprocessing's per-channel (mean, std), or None when its model input is x / 255 alone
Norm = tuple[tuple[float, ...], tuple[float, ...]] | None


def norm_of(pre: Preprocessing) -> Norm:
    return None if pre.mean is None or pre.std is None else (tuple(pre.mean), tuple(pre.std))


def _per_channel(x: Tensor, values: tuple[float, ...]) -> Tensor:
    return x.new_tensor(values).view(1, -1, 1, 1)


def to_unit_range(x: Tensor, norm: Norm) -> Tensor:
    """Model input under `norm` -> pixels in [0, 1] (the inverse of fewshot.data.imageio.model_input)."""
    return x if norm is None else x * _per_channel(x, norm[1]) + _per_channel(x, norm[0])


def normalise(x: Tensor, norm: Norm) -> Tensor:
    """Pixels in [0, 1] -> model input under `norm`: (x - mean) / std per channel."""
    return x if norm is None else (x - _per_channel(x, norm[0])) / _per_channel(x, norm[1])


def adapt_images(x: Tensor, channels: int, size: int) -> Tensor:
    """(N, C, H, W) float in [0, 1] -> (N, channels, size, size)."""
    x = x.float().contiguous()
    if x.shape[1] != channels:
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and channels == 1:
            w = x.new_tensor(LUMA).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        else:
            raise ConfigError(f"cannot convert {x.shape[1]}-channel images to the teacher's {channels} channels")
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _weights_digest(path: Path) -> str:
    return sha256_file(path)


@dataclass
class Teacher:
    """A frozen embedder + rule (+ optional base-class classifier) with its input format."""
    source: str
    backbone: Backbone
    channels: int
    size: int
    rule: DecisionRule
    train_classes: list[str]
    digest: str
    classifier: nn.Module | None = None
    precision: PrecisionPolicy = FP32
    norm: Norm = None  # the teacher's own input normalisation
    student_norm: Norm = None  # the normalisation of the images it is given (the student's cache)

    def set_precision(self, policy: PrecisionPolicy) -> Teacher:
        """Run the teacher's forward pass under `policy` (e.g. the student's bf16 on CPU)."""
        self.precision = policy
        prepare_model(self.backbone, policy)
        return self

    def to(self, device: torch.device) -> Teacher:
        self.backbone.to(device)
        if self.classifier is not None:
            self.classifier.to(device)
        return self

    @property
    def embedding_dim(self) -> int:
        return self.backbone.embedding_dim

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        """Student-format images (N, C, H, W) -> teacher embeddings (N, D_t), fp32."""
        dev = next(self.backbone.parameters()).device
        x = adapt_images(to_unit_range(x.to(dev).float(), self.student_norm), self.channels, self.size)
        x = prepare_input(normalise(x, self.norm), self.precision)
        with autocast_context(self.precision, dev):
            return self.backbone(x).float()

    @torch.no_grad()
    def class_logits(self, x: Tensor) -> Tensor:
        return self.class_head(self.embed(x))

    @torch.no_grad()
    def class_head(self, z: Tensor) -> Tensor:
        """Teacher embeddings (N, D_t) -> base-class logits (N, num_classes)."""
        if self.classifier is None:
            raise ConfigError(f"teacher {self.source} has no base-class classifier (only pre-training runs do); "
                              "set distill.kd_class_weight=0 or use a 'pretrain' run as teacher")
        return self.classifier(z).float()

    @torch.no_grad()
    def episode_logits(self, episodes: list[Episode], z_all: Tensor | None = None) -> list[Tensor]:
        """The teacher's query logits (n_query, n_way) for each episode, by its served decision.
        `z_all`: teacher embeddings of the episodes' images laid out support, query, support, ...
        (the layout of a learner's `LearnerOutput.images`), when already computed."""
        parts = [t for ep in episodes for t in (ep.support_x, ep.query_x)]
        if z_all is None:
            z_all = self.embed(torch.cat(parts))
        z = list(z_all.split([p.shape[0] for p in parts]))
        if self.rule.views != "none":  # the support images as the served decision teaches them
            for i, ep in enumerate(episodes):  # the shift in the student's pixels (the teacher's side may differ)
                shift = max(1, round(self.rule.view_shift * ep.support_x.shape[-1] / self.size)) \
                    if self.rule.view_shift else 0
                z[2 * i] = example_embeddings_torch(self.embed, ep.support_x, self.rule.views, shift)
        return [torch.from_numpy(episode(self.rule, z[2 * i].cpu().numpy(), ep.support_y.cpu().numpy(), ep.n_way,
                                         z[2 * i + 1].cpu().numpy()).logits).to(z[2 * i].device)
                for i, ep in enumerate(episodes)]

    def predict(self, episode: Episode) -> Tensor:
        return self.episode_logits([episode])[0]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "weights_sha256": self.digest}


def load_teacher(path: str | Path, *, data: Any = None) -> Teacher:
    """A teacher from a run folder (its best checkpoint) or a bundle folder; `data` (the student's
    RunData) gives the normalisation of the images the teacher will be given, and the batches that
    re-estimate batch norm for runs that need it (MAML family)."""
    p = resolve_bundle(path)  # a folder, or zoo:NAME
    if (p / "manifest.json").is_file() and (p / "model.onnx").is_file():
        teacher = _from_bundle(p)
    elif (p / "config.yaml").is_file():
        teacher = _from_run(p, data)
    else:
        raise CheckpointError(f"teacher {p} is neither a run folder (config.yaml) nor a bundle (manifest.json + "
                              "model.onnx); pass a folder made by `fewshot train`, `fewshot distill` or `fewshot export`")
    if data is not None:
        teacher.student_norm = norm_of(data.cache.preprocessing)
    if is_zoo_name(path):  # named as given: a resume in another checkout (another zoo path) is the same teacher
        teacher.source = str(path)
    return teacher


M = TypeVar("M", bound=nn.Module)


def _frozen(m: M) -> M:
    m.eval()
    for q in m.parameters():
        q.requires_grad_(False)
    return m


def _from_bundle(p: Path) -> Teacher:
    try:
        bundle = load_bundle(p)
    except CheckpointError as exc:
        raise CheckpointError(f"teacher bundle {p} cannot be loaded: {exc}") from exc
    classes = bundle.manifest.source.get("train_classes")
    if classes is None:
        raise CheckpointError(f"teacher bundle {p} does not record its training classes (older export); "
                              "re-export it with `fewshot export` so the leak check can run")
    pre = bundle.preprocessing
    return Teacher(str(p), _frozen(bundle.backbone), pre.channels, pre.size, bundle.decision_rule,
                   list(classes), _weights_digest(p / WEIGHTS), norm=norm_of(pre))


def _from_run(p: Path, data: Any) -> Teacher:
    try:
        learner, manifest = load_trained(p)
    except (CheckpointError, FileNotFoundError) as exc:
        raise CheckpointError(f"teacher run {p} cannot be loaded: {exc}") from exc
    config = load_config(p / "config.yaml")
    if learner.deployment.embedder == "bn-reestimated" and data is None:
        raise CheckpointError(f"teacher run {p} needs its batch norm re-estimated; export it and pass the bundle")
    backbone = deployable_backbone(learner, data, config)
    # the head export chooses for this run (needs `data` only for the bn-reestimated, checked above);
    # without example views: the views export would choose are measured on validation episodes at
    # export (a teacher that should teach through them is given as its bundle or zoo name)
    rule = learner.deployment.rule if data is None else choose_rule(learner, backbone, data, config)[0]
    pre = Preprocessing.from_dict(manifest["data"]["preprocessing"])
    classifier = getattr(learner, "classifier", None)
    digest = _weights_digest(p / "checkpoints" / "best" / "model.safetensors")
    return Teacher(str(p), _frozen(backbone), pre.channels, pre.size, rule,
                   sorted(train_classes(p)), digest, _frozen(classifier.float()) if classifier is not None else None,
                   norm=norm_of(pre))


def check_no_leak(teacher: Teacher, test_classes: list[str], split_name: str = "test") -> None:
    """Refuse a teacher trained on any class of the student's test split, naming the classes."""
    leaked = sorted(set(teacher.train_classes) & set(test_classes))
    if leaked:
        raise ConfigError(
            f"teacher {teacher.source} was trained on {len(leaked)} classes of the student's {split_name} split "
            f"(e.g. {json.dumps(leaked[:5])}): distilling from it would leak test classes. Use a teacher trained "
            "on the student's training classes only")


def load_teachers(cfg: DistillConfig, data: RunData, device: torch.device) -> list[Teacher]:
    """Every teacher of `cfg`, frozen, checked for leaks into the student's test split."""
    teachers = []
    for t in cfg.teachers:
        teacher = load_teacher(t.path, data=data)
        if "test" in data.splits:
            check_no_leak(teacher, data.class_names("test"))
        teachers.append(teacher.to(device))
    return teachers
