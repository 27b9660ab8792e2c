"""Backbone contract: (N, C, H, W) -> (N, embedding_dim) for any channels and supported size;
config rebuilds the same network; width scales it; every backbone is torch.export-able."""

from __future__ import annotations

import pytest
import torch

from fewshot.backbones import backbone_from_config, create_backbone, list_backbones
from fewshot.backbones.norm import EpisodicBatchNorm2d, context_statistics
from fewshot.errors import ConfigError

NAMES = ["conv4", "resnet12", "inception"]
SMALL = {"conv4": 0.25, "resnet12": 0.1, "inception": 0.25}  # widths that keep the tests fast


def test_registry_lists_all_backbones():
    assert set(NAMES) <= set(list_backbones())


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(
        ConfigError, match=r"unknown backbone 'resnet50'.*conv4.*inception.*resnet12"
    ):
        create_backbone("resnet50", in_channels=1, image_size=28)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (3, 84), (1, 40)])
def test_embedding_shape(name, channels, size):
    net = create_backbone(name, in_channels=channels, image_size=size, width=SMALL[name]).eval()
    z = net(torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(0)))
    assert z.shape == (3, net.embedding_dim)
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("name", NAMES)
def test_config_rebuilds_identical_network(name):
    net = create_backbone(name, in_channels=3, image_size=32, width=SMALL[name],
                          generator=torch.Generator().manual_seed(5)).eval()
    clone = backbone_from_config(net.config).eval()
    assert not torch.equal(next(clone.parameters()), next(net.parameters()))  # other seed, other weights
    clone.load_state_dict(net.state_dict())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clone(x), net(x))


@pytest.mark.parametrize("name", NAMES)
def test_width_scales_parameters_and_embedding(name):
    small = create_backbone(name, in_channels=1, image_size=28, width=0.5)
    large = create_backbone(name, in_channels=1, image_size=28, width=1.0)
    n_small = sum(p.numel() for p in small.parameters())
    n_large = sum(p.numel() for p in large.parameters())
    assert n_small < n_large / 2
    assert small.embedding_dim < large.embedding_dim


def test_resnet12_default_dim_is_640():
    assert create_backbone("resnet12", in_channels=3, image_size=84).embedding_dim == 640


@pytest.mark.parametrize("name", NAMES)
def test_bad_width_or_size_is_a_config_error(name):
    with pytest.raises(ConfigError, match="width"):
        create_backbone(name, in_channels=1, image_size=28, width=0)
    with pytest.raises(ConfigError, match="image_size 4"):
        create_backbone(name, in_channels=1, image_size=4)


@pytest.mark.parametrize("name", NAMES)
def test_torch_export(name):
    net = create_backbone(name, in_channels=1, image_size=28, width=SMALL[name]).eval()
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    exported = torch.export.export(net, (x,))
    torch.testing.assert_close(exported.module()(x), net(x))


def test_context_statistics_normalise_every_row_with_the_first_rows():
    bn = EpisodicBatchNorm2d(4).train()
    x = torch.randn(6, 4, 3, 3) * 3 + 1
    with context_statistics(bn, 2):
        y = bn(x)
    ctx = x[:2]
    mean, var = ctx.mean((0, 2, 3)), ctx.var((0, 2, 3), unbiased=False)
    expected = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    torch.testing.assert_close(y, expected)
    assert torch.equal(bn.running_mean, torch.zeros(4)), (
        "context statistics must not touch running stats"
    )
    torch.testing.assert_close(bn(x[:2]), y[:2])  # same as train-mode BN on the context rows
    assert bn.context_rows is None


@pytest.mark.parametrize("name", NAMES)
def test_initialisation_comes_from_the_generator_not_the_global_rng(name):
    state = torch.get_rng_state()
    a = create_backbone(name, in_channels=1, image_size=28, width=SMALL[name], generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)  # the process-wide RNG was not advanced
    with torch.random.fork_rng():
        torch.manual_seed(123)  # the global seed does not matter
        b = create_backbone(name, in_channels=1, image_size=28, width=SMALL[name], generator=torch.Generator().manual_seed(3))
    c = create_backbone(name, in_channels=1, image_size=28, width=SMALL[name], generator=torch.Generator().manual_seed(4))
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), k
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_conv4_rfs_variant_averages_an_unpooled_last_map():
    # RFS's ConvNet: no pool after block 4, the map averaged: channels-d, whatever the image size
    rfs = create_backbone("conv4", in_channels=3, image_size=84, width=0.25, pool_last=False, global_pool=True).eval()
    assert rfs.embedding_dim == 16 and rfs.config["pool_last"] is False and rfs.config["global_pool"] is True
    x = torch.rand(2, 3, 84, 84, generator=torch.Generator().manual_seed(0))
    assert rfs.encoder(x).shape == (2, 16, 10, 10)  # 84 -> 42 -> 21 -> 10, then no fourth pool
    z = rfs(x)
    torch.testing.assert_close(z, rfs.encoder(x).mean((2, 3)))
    # the recorded config rebuilds the same network
    clone = backbone_from_config(rfs.config).eval()
    clone.load_state_dict(rfs.state_dict())
    torch.testing.assert_close(clone(x), z)
    # the default Conv-4 records neither key: configs saved before the options existed are unchanged
    plain = create_backbone("conv4", in_channels=3, image_size=84, width=0.25)
    assert "pool_last" not in plain.config and "global_pool" not in plain.config
    assert plain.embedding_dim == 16 * 5 * 5
    assert plain.state_dict().keys() == rfs.state_dict().keys()  # checkpoints of either load by the same names
    exported = torch.export.export(rfs, (x,))
    torch.testing.assert_close(exported.module()(x), z)
