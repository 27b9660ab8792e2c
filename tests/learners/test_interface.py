"""The FewShotLearner contract: registry, configs, inductive predictions, two-phase API,
determinism, input checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fewshot.episodes.types import Episode
from fewshot.errors import ConfigError
from fewshot.learners import create_learner, learner_from_config, list_learners
from fewshot.training.trainer import Trainer

ALL = ["anil", "fomaml", "maml", "metasgd", "pretrain", "protonet", "reptile"]
KW = {"pretrain": {"num_classes": 24}, "reptile": {"inner_steps": 2, "eval_inner_steps": 3}}


def build(name, small_conv4, seed=0, **kw):
    return create_learner(name, small_conv4(seed), **{**KW.get(name, {}), **kw})


def query_subset(ep: Episode, rows: torch.Tensor) -> Episode:
    return dataclasses.replace(ep, query_x=ep.query_x[rows], query_y=ep.query_y[rows])


def test_registry_lists_every_learner():
    assert list_learners() == ALL


def test_unknown_learner_lists_valid_ones(small_conv4):
    with pytest.raises(
        ConfigError, match="unknown learner 'matchingnet'; valid learners: anil, fomaml"
    ):
        create_learner("matchingnet", small_conv4())


def test_bad_arguments_name_the_problem(small_conv4):
    with pytest.raises(ConfigError, match="protonet.*'temperature'"):
        create_learner("protonet", small_conv4(), temperature=2.0)
    with pytest.raises(ConfigError, match="metric 'manhattan'"):
        create_learner("protonet", small_conv4(), metric="manhattan")
    with pytest.raises(ConfigError, match="inner_lr must be > 0; got -1"):
        create_learner("maml", small_conv4(), inner_lr=-1)


@pytest.mark.parametrize("name", ALL)
def test_config_rebuilds_the_learner(name, small_conv4):
    learner = build(name, small_conv4)
    assert learner.config["name"] == name
    assert learner_from_config(learner.config, small_conv4()).config == learner.config


@pytest.mark.parametrize("name", ALL)
def test_predict_is_inductive(name, episodes, small_conv4):
    """Predicting a subset of the queries gives the same rows as predicting all of them."""
    learner = build(name, small_conv4)
    ep = episodes(1, seed=3, n_query=4)[0]
    rows = torch.tensor([0, 7, 13, 19])
    full = learner.predict(ep)
    part = learner.predict(query_subset(ep, rows))
    assert full.shape == (20, 5)
    torch.testing.assert_close(part, full[rows], atol=1e-4, rtol=1e-4)


def test_transductive_maml_depends_on_other_queries(episodes, small_conv4):
    """The check above can fail: with query batch statistics, other queries change a row."""
    learner = build("maml", small_conv4, transductive=True)
    ep = episodes(1, seed=3, n_query=4)[0]
    rows = torch.tensor([0, 7, 13, 19])
    assert not torch.allclose(
        learner.predict(query_subset(ep, rows)), learner.predict(ep)[rows], atol=1e-4
    )


@pytest.mark.parametrize("name", ALL)
def test_fit_then_forward_equals_predict(name, episodes, small_conv4):
    learner = build(name, small_conv4).eval()
    ep = episodes(1, seed=4)[0]
    with torch.no_grad():
        logits = learner.fit(ep.support_x, ep.support_y, ep.n_way)(ep.query_x)
    torch.testing.assert_close(logits.float(), learner.predict(ep))


@pytest.mark.parametrize("name", ["protonet", "maml", "reptile", "pretrain"])
def test_training_is_deterministic(name, episodes, small_conv4):
    def run() -> tuple[list[dict[str, float]], torch.Tensor]:
        learner = build(name, small_conv4, seed=5)
        opt = torch.optim.SGD(learner.parameters(), lr=0.05)
        out = []
        for i in range(2):
            if learner.data_kind == "batches":
                g = torch.Generator().manual_seed(i)
                batch = (
                    torch.rand(8, 1, 28, 28, generator=g),
                    torch.randint(0, 24, (8,), generator=g),
                )
            else:
                batch = episodes(2, seed=i)
            out.append(step_with(learner, batch, opt))
        return out, learner.predict(episodes(1, seed=9)[0])

    (m1, p1), (m2, p2) = run(), run()
    assert m1 == m2
    assert torch.equal(p1, p2)


def test_episodic_learner_rejects_plain_batches(small_conv4):
    learner = build("protonet", small_conv4)
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="list\\[Episode\\]"):
        step_with(learner, (torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)), opt)


def test_pretrain_rejects_labels_outside_its_classes(small_conv4):
    learner = build("pretrain", small_conv4)
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="labels must be in 0..23; got range 0..30"):
        step_with(learner, (torch.rand(2, 1, 28, 28), torch.tensor([0, 30])), opt)


def test_support_labels_must_cover_every_class(small_conv4, episodes):
    ep = episodes(1)[0]
    learner = build("protonet", small_conv4)
    with pytest.raises(ConfigError, match=r"cover 0..5 .* n_way=6"):
        learner.fit(ep.support_x, ep.support_y, 6)


def test_forward_before_fit_is_an_error(small_conv4):
    with pytest.raises(ConfigError, match="before fit"):
        build("maml", small_conv4)(torch.rand(1, 1, 28, 28))


def test_cosine_protonet_learns_its_scale(small_conv4, episodes):
    learner = build("protonet", small_conv4, metric="cosine", init_scale=5.0)
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    before = float(learner.log_scale.detach())
    step_with(learner, episodes(2), opt)
    assert float(learner.log_scale.detach()) != before


def test_gradient_learners_need_episodic_batch_norm():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    net.embedding_dim = 4 * 26 * 26  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="EpisodicBatchNorm2d"):
        create_learner("maml", net)


def step_with(learner, batch, opt):  # type: ignore[no-untyped-def]
    """One optimiser step by the one trainer."""
    return Trainer(learner, opt).step(batch)


def test_a_learner_config_without_a_name_is_refused_naming_the_fix(small_conv4) -> None:
    with pytest.raises(ConfigError, match="needs a 'name' string"):
        learner_from_config({"metric": "cosine"}, small_conv4())
