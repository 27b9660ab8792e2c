"""Data-parallel training on `torch.distributed`, launched by `torchrun`.

`torchrun --nproc-per-node N -m fewshot train CONFIG` starts N processes; `World.from_env` reads
the rank and world size torchrun gives each one (RANK, WORLD_SIZE, LOCAL_RANK; nothing is written
to the environment), and `process_group` joins them (gloo on CPU, NCCL on GPU) for the duration of
the command. The training loop then splits every step's meta-batch (or batch) over the ranks by
index, so the global episode stream, `train.steps` and a resume are the same whatever N is; the
trainer wraps the learner (and a distillation objective's projectors) in
`DistributedDataParallel`, which averages gradients across ranks during backward.
"""

from __future__ import annotations

import datetime
import gc
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fewshot.errors import ConfigError, FewshotError


class DistributedError(FewshotError):
    """A process of a distributed run failed or cannot reach the others."""


@dataclass(frozen=True)
class World:
    """This process's place in a distributed run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size or self.local_rank < 0:
            raise ConfigError(f"invalid distributed world: rank {self.rank} of {self.size} (local rank "
                              f"{self.local_rank}); launch with torchrun, which sets RANK / WORLD_SIZE / LOCAL_RANK")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> World:
        """The world torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK; one process without them."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            return cls(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
        except ValueError:
            raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers; got {env.get('RANK')!r} / "
                              f"{env.get('WORLD_SIZE')!r} / {env.get('LOCAL_RANK')!r}; launch with torchrun") from None

    def split(self, total: int, what: str) -> int:
        """`total` items of a step divided over the ranks; refused when it does not divide."""
        if total % self.size:
            fits = [n for n in range(1, total + 1) if total % n == 0]
            raise ConfigError(f"{what}={total} cannot be split over {self.size} processes; use a {what} that "
                              f"{self.size} divides (e.g. {total + self.size - total % self.size}) or "
                              f"--nproc-per-node in {fits}")
        return total // self.size

    def device_for(self, device: torch.device) -> torch.device:
        """Each rank on its own GPU (its local rank) when training on CUDA."""
        if device.type != "cuda" or not self.distributed:
            return device
        if device.index is not None:
            raise ConfigError(f"train.device={str(device)!r} would put every rank on one GPU; under torchrun use "
                              "device auto or cuda (rank r takes GPU LOCAL_RANK)")
        if self.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {self.local_rank} has no GPU (this machine has "
                              f"{torch.cuda.device_count()}); use --nproc-per-node <= the number of GPUs")
        return torch.device("cuda", self.local_rank)


# how gloo / NCCL report a peer that died or a group that broke (gloo raises plain RuntimeErrors)
_COMM_FAILURE = re.compile(r"gloo|nccl|connection (closed|reset|refused)|broken pipe|timed out|timeout", re.I)


def is_comm_failure(exc: BaseException) -> bool:
    """A failure of the process group (a peer gone, a timeout), not of this rank's own work."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and bool(_COMM_FAILURE.search(str(exc))))


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


@contextmanager
def process_group(world: World, device_type: str = "cpu", timeout_s: float = 1800.0) -> Iterator[World]:
    """Join the run's process group (env:// rendezvous from torchrun) while the block runs; no-op
    for one process. A rank that cannot reach the others gets an error naming the fix."""
    if not world.distributed:
        yield world
        return
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run one process (no torchrun)")
    if device_type == "cuda":  # NCCL: one GPU per rank (the launcher's process, not library state)
        torch.cuda.set_device(world.local_rank)
    try:
        dist.init_process_group(backend_for(device_type), rank=world.rank, world_size=world.size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"rank {world.rank} of {world.size} could not join the process group "
                               f"({type(exc).__name__}: {exc}); launch every rank with the same torchrun "
                               "command (torchrun --nproc-per-node N -m fewshot train CONFIG)") from None
    try:
        yield world
        gc.collect()  # drop finished DDP reducers / gloo work before the group goes (they hold tensors)
        dist.barrier()  # leave together: a rank tearing down while a peer still talks can abort it
    finally:
        dist.destroy_process_group()


def all_mean(values: dict[str, float], world: World, device: torch.device) -> dict[str, float]:
    """The mean of each value over the ranks (same keys on every rank)."""
    if not world.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world.size for k, v in zip(keys, t.tolist())}


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (a shared decision, e.g. out of time)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
