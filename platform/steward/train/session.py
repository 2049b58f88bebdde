"""Where the training loop runs: a Ray Train worker, or the process of a one-worker Tune trial.

A sweep's one-worker trials skip Ray Train: a Train run starts a controller and worker actors (new processes that
import torch and steward, ~15 s here), which dwarfs a small model's epochs and so every scheduler's savings. Such a
trial runs the same loop in Tune's own (reused) trial process instead, as Ray recommends for non-distributed
trials; multi-worker trials keep Ray Train.
"""

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Session:
    """What the loop asks of its runner: its rank, reporting, Ray's own checkpoint of a restarted run, the model."""

    rank: int
    world: int
    report: Callable[..., None]  # (metrics, checkpoint=None)
    latest_checkpoint: Callable[[], Any]  # a restarted run's latest checkpoint (ray.train.Checkpoint) or None
    prepare_model: Callable[[nn.Module], nn.Module]  # device placement, and DDP across workers
    # this worker's shard of a dataset given to the trainer (a ray.data.DataIterator), or None without one
    dataset_shard: Callable[[str], Any] = lambda name: None


def train_session() -> Session:
    """The session of a Ray Train worker."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return Session(
        ctx.get_world_rank(),
        ctx.get_world_size(),
        ray.train.report,
        ray.train.get_checkpoint,
        ray.train.torch.prepare_model,
        ray.train.get_dataset_shard,
    )


def trial_session(use_gpu: bool) -> Session:
    """A one-worker Tune trial's session, in a process with a one-process gloo group for what expects one.

    The group is made once per process and kept: Tune reuses the process for the next trial, and DeepSpeed keeps
    hold of the group it first saw.
    """
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # torchrun's variables, which DeepSpeed reads to join the group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
    device = torch.device("cuda" if use_gpu else "cpu")
    return Session(0, 1, tune_report, lambda: None, lambda model: model.to(device))


def tune_report(metrics: dict, checkpoint: Any = None) -> None:
    """tune.report; a trial the scheduler stops at its final epoch carries on, to export its model."""
    from ray import tune
    from ray.train._internal.session import get_session

    try:
        tune.report(metrics, checkpoint=checkpoint)
    except SystemExit:  # tune.report's way of saying the scheduler stopped this trial
        if not metrics.get("final"):
            raise
        # Tune no longer listens to this trial: its closing report would wait out Tune's 60 s grace, then fail
        session = get_session()
        assert session is not None, "tune.report ran, so this is a Tune trial"
        session.pause_reporting()
