"""Data-parallel training under torchrun (gloo, two processes on localhost).

The equality test is the contract: for every learner family, two ranks that each train on their
half of every meta-batch end with identical parameters, equal (to float tolerance) to one process
that sees the same episodes with the same effective meta-batch split the same way
(`train.accumulate=2`: batch-norm batch statistics are per micro-batch there and per rank here).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_cases import CASES, case_config, final_params
from PIL import Image
from safetensors.torch import load_file
from synthetic_runs import config, run_data, synthetic_cache

from fewshot.data.cache import PackedCache
from fewshot.distill.task import objective_factory
from fewshot.errors import ConfigError
from fewshot.training.checkpoint import read_manifest
from fewshot.training.distributed import World
from fewshot.training.loop import build_learner, train

HERE = Path(__file__).parent


def torchrun(*args: str, cwd: Path | None = None, nproc: int = 2, timeout: float = 600,
             monitor_interval: float | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    launcher = [] if monitor_interval is None else [f"--monitor-interval={monitor_interval}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *launcher, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case trained by 2 ranks, plus `half`: maml-fast stopped after 2 of 4 steps."""
    root = tmp_path_factory.mktemp("ddp")
    cache = synthetic_cache(root)
    teacher = config(root / "teacher", name="teacher", model={"backbone_args": {"hidden": 16}}, steps=3)
    train(teacher, data=run_data(cache), progress=False)
    proc = torchrun(str(HERE / "ddp_worker.py"), str(root / "out"), str(cache.path), str(teacher.run_dir()),
                    *CASES, "half=maml-fast@2", cwd=HERE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_with_the_same_episodes(case: str, ddp_runs: Path) -> None:
    out = ddp_runs / "out"
    rank0, rank1 = (load_file(str(out / f"{case}-rank{r}.safetensors")) for r in (0, 1))
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"{case}: {k} differs between the ranks"
    data = run_data(PackedCache.open(ddp_runs / "cache"))
    one = case_config(ddp_runs / "one", case, ddp_runs / "teacher" / "runs" / "teacher", name=case, accumulate=2)
    factory = objective_factory(one, data) if one.distill is not None else None
    res = train(one, data=data, progress=False, objective_factory=factory)
    ref = final_params(res.learner)
    init = final_params(build_learner(one, data, data.cache.image_shape))
    moved = _max_diff(ref, init)
    assert moved > 1e-3, f"{case}: training barely moved the parameters ({moved}); the comparison would be vacuous"
    assert _max_diff(rank0, ref) < 1e-4 * max(1.0, moved), case
    # the run folder is rank 0's and complete
    run = ddp_runs / "out" / "ddp" / "runs" / case
    assert read_manifest(run / "checkpoints" / "last")["step"] == 4
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + 4


def test_a_run_resumes_with_a_different_number_of_processes(ddp_runs: Path) -> None:
    """2 ranks train steps 1-2, one process steps 3-4: the same as one process all the way."""
    data = run_data(PackedCache.open(ddp_runs / "cache"))
    teacher = ddp_runs / "teacher" / "runs" / "teacher"
    half = case_config(ddp_runs / "out" / "ddp", "maml-fast", teacher, name="half", steps=4)
    assert read_manifest(half.run_dir() / "checkpoints" / "last")["step"] == 2
    resumed = train(half, data=data, progress=False)
    assert resumed.steps == 4
    whole = train(case_config(ddp_runs / "whole", "maml-fast", teacher, name="whole"), data=data, progress=False)
    assert _max_diff(final_params(resumed.learner), final_params(whole.learner)) < 1e-5


@pytest.mark.slow
def test_a_dead_rank_stops_the_others_with_the_checkpoint_intact(tmp_path: Path) -> None:
    cache = synthetic_cache(tmp_path)
    # torchrun's agent SIGTERMs the surviving rank as soon as its monitor sees the dead one (every 0.1 s by
    # default), which can come before rank 0's own message; 5 s lets the message through on a busy machine
    proc = torchrun(str(HERE / "ddp_worker.py"), str(tmp_path / "out"), str(cache.path), str(tmp_path), "die@3",
                    cwd=HERE, monitor_interval=5)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "rank 0 of 2 lost the other processes at step 4" in log, log[-4000:]
    assert "the last checkpoint (step 2)" in log and "rerun the same torchrun command" in log
    last = tmp_path / "out" / "ddp" / "runs" / "die" / "checkpoints" / "last"
    assert read_manifest(last)["step"] == 2
    assert load_file(str(last / "model.safetensors"))  # readable, not half written


def test_a_meta_batch_the_world_cannot_split_is_refused(tmp_path: Path) -> None:
    data = run_data(synthetic_cache(tmp_path))
    with pytest.raises(ConfigError, match=r"train.meta_batch=4 cannot be split over 3 processes.*e\.g\. 6"):
        train(config(tmp_path, meta_batch=4), data=data, progress=False, world=World(0, 3))
    with pytest.raises(ConfigError, match=r"train.batch_size=8 cannot be split over 3 processes"):
        train(config(tmp_path, "pretrain", batch_size=8), data=data, progress=False, world=World(1, 3))
    with pytest.raises(ConfigError, match="launch with torchrun"):
        World.from_env({"WORLD_SIZE": "two"})
    with pytest.raises(ConfigError, match="rank 2 of 2"):
        World(2, 2)
    with pytest.raises(ConfigError, match="would put every rank on one GPU"):
        World(1, 2, 1).device_for(torch.device("cuda", 0))
    assert World(1, 2, 1).device_for(torch.device("cpu")) == torch.device("cpu")
    assert World.from_env({}) == World()
    assert World.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == World(1, 2, 1)


def _image_folder(root: Path, classes: int = 12, per_class: int = 6, size: int = 16) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        pattern = rng.random((size, size)) < 0.3
        folder = root / f"dom{c % 3}" / f"cls{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = (pattern ^ (rng.random((size, size)) < 0.05)) * 255
            Image.fromarray(img.astype(np.uint8)).save(folder / f"{i}.png")


@pytest.mark.slow
def test_fewshot_train_under_torchrun(tmp_path: Path) -> None:
    """The command users run: `torchrun --nproc-per-node 2 -m fewshot train CONFIG`."""
    _image_folder(tmp_path / "data" / "tiny")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"name: tiny\ndata: {{root: {tmp_path / 'data'}, dataset: tiny, image_size: 16, split: classes}}\n"
        "model: {backbone: conv4, backbone_args: {hidden: 8}}\n"
        "train: {steps: 4, meta_batch: 2, way: 3, shot: 1, query: 2, val_every: 2, val_episodes: 5, val_way: 2,"
        " val_query: 2, checkpoint_every: 2, precision: fp32, device: cpu}\n")
    ok = torchrun("-m", "fewshot", "train", str(cfg), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[:6000]
    assert "trained to step 4 on 2 processes" in ok.stdout
    assert read_manifest(tmp_path / "runs" / "tiny" / "checkpoints" / "last")["step"] == 4
    bad = torchrun("-m", "fewshot", "train", str(cfg), "train.meta_batch=3", "--no-resume", cwd=tmp_path)
    assert bad.returncode != 0
    assert "train.meta_batch=3 cannot be split over 2 processes" in bad.stderr
