"""Real Omniglot end to end: a short ProtoNet training run, evaluated by the protocol on test classes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewshot.config import config_from_dict
from fewshot.data.splits import make_splits
from fewshot.training.data import RunData
from fewshot.training.loop import train
from fewshot.training.protocol import evaluate_run


@pytest.mark.slow
@pytest.mark.integration
def test_protonet_learns_omniglot_and_is_evaluated_on_unseen_classes(
    tmp_path: Path, data_root: Path, omniglot_prepared  # type: ignore[no-untyped-def]
) -> None:
    cache = omniglot_prepared.cache
    splits = make_splits(cache, "vinyals", splits_dir=data_root / "omniglot" / "splits" / "vinyals")
    data = RunData(cache, splits, "vinyals")
    cfg = config_from_dict({
        "name": "omniglot-short", "output_dir": str(tmp_path), "data": {"root": str(data_root)},
        "train": {"steps": 60, "way": 20, "shot": 5, "query": 5, "val_every": 60, "val_episodes": 50,
                  "checkpoint_every": 60, "device": "cpu", "schedule": "constant"},
    })
    train(cfg, data=data, progress=False)
    res = evaluate_run(cfg.run_dir(), way=5, shot=1, episodes=600, data=data, progress=False, device="cpu")
    assert res.episodes == 600 and res.ci95 < 0.02
    assert res.mean > 0.80  # chance is 0.20; 60 episodes of training already give ~85-90%
    assert len(res.per_domain) == 13  # the 13 alphabets of the Vinyals test split
