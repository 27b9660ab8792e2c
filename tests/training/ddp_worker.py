"""Run under torchrun by tests/training/test_distributed.py: trains each named case on the
synthetic collection with this process's rank, and saves this rank's final parameters (from its
own memory, not from rank 0's checkpoint).

    torchrun --standalone --nproc-per-node 2 ddp_worker.py OUT CACHE TEACHER [NAME=]CASE[@STEPS] ...

A run is named NAME (default: the case); `die@S` trains ProtoNet and makes rank 1 exit abruptly
after step S.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ddp_cases import case_config, final_params
from safetensors.torch import save_file
from synthetic_runs import run_data

from fewshot.data.cache import PackedCache
from fewshot.distill.task import objective_factory
from fewshot.training.distributed import World, process_group
from fewshot.training.loop import train


def main(out: Path, cache: Path, teacher: Path, cases: list[str]) -> None:
    data = run_data(PackedCache.open(cache))
    with process_group(World.from_env()) as world:
        for spec in cases:
            name, _, rest = spec.rpartition("=")
            case, _, steps = rest.partition("@")
            die_after = int(steps) if case == "die" and world.rank == 1 else None

            def on_step(step: int, _: Any, die_after: int | None = die_after) -> None:
                if step == die_after:
                    os._exit(3)  # a crash: no cleanup, no goodbye to the process group

            cfg = case_config(out / "ddp", "protonet" if case == "die" else case, teacher, name=name or case,
                              steps=8 if case == "die" else int(steps or 4))
            factory = objective_factory(cfg, data) if cfg.distill is not None else None
            res = train(cfg, data=data, progress=False, world=world, objective_factory=factory, on_step=on_step)
            save_file(final_params(res.learner), str(out / f"{name or case}-rank{world.rank}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
