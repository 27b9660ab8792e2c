"""Teachers keep their own input format; bundles and runs load; leaks and unloadable teachers are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot.artifacts.bundle import export_bundle
from fewshot.backbones import create_backbone
from fewshot.data.imageio import Preprocessing
from fewshot.distill.teacher import adapt_images, check_no_leak, load_teacher
from fewshot.episodes.types import Episode
from fewshot.errors import CheckpointError, ConfigError


def test_adapt_images_converts_channels_and_size() -> None:
    grey = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    rgb = adapt_images(grey, 3, 16)
    assert rgb.shape == (2, 3, 16, 16) and torch.equal(rgb[:, 0], rgb[:, 2]) and torch.equal(rgb[:, 1], grey[:, 0])
    # ITU-R 601 luma of a pure-red image is 0.299
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    assert adapt_images(red, 1, 8).flatten().unique().tolist() == pytest.approx([0.299])
    big = adapt_images(grey, 1, 32)
    assert big.shape == (2, 1, 32, 32) and abs(float(big.mean() - grey.mean())) < 0.02
    with pytest.raises(ConfigError, match="cannot convert 2-channel images"):
        adapt_images(torch.rand(1, 2, 8, 8), 3, 8)


def _bundle(out: Path, classes: list[str] | None, pre: Preprocessing = Preprocessing("RGB", 32)) -> Path:
    backbone = create_backbone("conv4", in_channels=3, image_size=32, width=0.25)
    samples = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    source = {"run": "test"} if classes is None else {"run": "test", "train_classes": classes}
    return export_bundle(backbone, out, preprocessing=pre, source=source, metrics={},
                         data_fingerprint="x", calibration=None, sample_images=samples)


def test_a_bundle_teaches_a_student_of_another_input_format(tmp_path: Path) -> None:
    teacher = load_teacher(_bundle(tmp_path / "b", ["A/c1", "A/c2"]))
    assert (teacher.channels, teacher.size) == (3, 32)
    g = torch.Generator().manual_seed(0)
    ep = Episode(torch.rand(6, 1, 16, 16, generator=g), torch.tensor([0, 0, 1, 1, 2, 2]),
                 torch.rand(3, 1, 16, 16, generator=g), torch.tensor([0, 1, 2]), torch.arange(3), torch.zeros(3, dtype=torch.long))
    assert teacher.embed(ep.support_x).shape == (6, teacher.embedding_dim)
    assert teacher.predict(ep).shape == (3, 3)
    assert not any(p.requires_grad for p in teacher.backbone.parameters())  # frozen
    check_no_leak(teacher, ["B/c1"])
    with pytest.raises(ConfigError, match=r'trained on 1 classes of the student\'s test split \(e.g. \["A/c2"\]\)'):
        check_no_leak(teacher, ["A/c2", "B/c1"])


def test_a_teacher_sees_the_pixels_a_normalised_student_sees_under_its_own_normalisation(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fewshot.artifacts.bundle import load_bundle
    from fewshot.artifacts.embedders import TorchEmbedder
    from fewshot.data.imageio import model_input

    teacher_pre = Preprocessing("RGB", 32, mean=(0.48, 0.46, 0.41), std=(0.23, 0.22, 0.22))
    student_pre = Preprocessing("RGB", 32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    path = _bundle(tmp_path / "b", ["A/c1"], teacher_pre)
    teacher = load_teacher(path, data=SimpleNamespace(cache=SimpleNamespace(preprocessing=student_pre)))
    pixels = np.random.default_rng(1).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    student_input = torch.from_numpy(model_input(pixels, student_pre))
    served = TorchEmbedder(load_bundle(path).backbone, teacher_pre).embed(pixels)  # the bundle's own input path
    assert np.allclose(teacher.embed(student_input).numpy(), served, atol=1e-4)


def test_unloadable_teachers_are_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="re-export it"):
        load_teacher(_bundle(tmp_path / "old", None))  # no record of its training classes
    b = _bundle(tmp_path / "b", ["A/c1"])
    (b / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(CheckpointError, match="teacher bundle .* cannot be loaded"):
        load_teacher(b)
    with pytest.raises(CheckpointError, match="neither a run folder"):
        load_teacher(tmp_path)


def test_a_bundle_teacher_teaches_its_classes_through_its_example_views(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fewshot.artifacts.bundle import load_bundle
    from fewshot.artifacts.embedders import TorchEmbedder
    from fewshot.data.imageio import model_input
    from fewshot.decision import DecisionRule, episode, example_embeddings

    pre = Preprocessing("RGB", 32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    backbone = create_backbone("conv4", in_channels=3, image_size=32, width=0.25)
    samples = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    rule = DecisionRule("prototype", "euclidean", views="shift4", view_shift=3)
    path = export_bundle(backbone, tmp_path / "b", preprocessing=pre, source={"run": "test", "train_classes": ["A/c"]},
                         metrics={}, data_fingerprint="x", calibration=None, sample_images=samples,
                         deployment={"rule": rule.to_dict()})
    teacher = load_teacher(path, data=SimpleNamespace(cache=SimpleNamespace(preprocessing=pre)))
    assert teacher.rule == rule
    rng = np.random.default_rng(2)
    support, query = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    ys = np.array([0, 0, 1, 1])
    ep = Episode(torch.from_numpy(model_input(support, pre)), torch.from_numpy(ys), torch.from_numpy(model_input(query, pre)),
                 torch.tensor([0, 1, 1]), torch.arange(2), torch.zeros(2, dtype=torch.long))
    # the service's path: uint8 pixels, numpy views, the bundle's embedder
    served = TorchEmbedder(load_bundle(path).backbone, pre).embed
    expect = episode(rule, example_embeddings(served, support, "shift4", 3), ys, 2, served(query)).logits
    plain = episode(rule, served(support), ys, 2, served(query)).logits
    got = teacher.predict(ep).numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-3, atol=1e-3)
    assert not np.allclose(got, plain, rtol=1e-3, atol=1e-3)
