"""Checkpoints through Ray Train: every rank's engine state plus where the loop was, and the resume path."""

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import torch

STATE_FILE = "steward_state.json"


@contextmanager
def checkpoint_dir(engine: Any, rank: int, loop_state: dict):
    """Yield a ray.train.Checkpoint (or None on ranks with nothing to save) holding the engine and loop state."""
    if rank != 0 and not engine.every_rank_saves:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="steward-ckpt-") as folder:
        engine.save(Path(folder))
        if rank == 0:
            (Path(folder) / STATE_FILE).write_text(json.dumps(loop_state))
        yield ray.train.Checkpoint.from_directory(folder)


def restore(
    engine: Any, latest: ray.train.Checkpoint | None, initial: ray.train.Checkpoint | None = None
) -> dict | None:
    """Load the checkpoint to continue from and return its loop state (with `source`: where it came from).

    `latest`, Ray's own latest checkpoint of this run, wins (a restart after a worker failure, a --resume);
    otherwise `initial`, a checkpoint handed in from outside (a Tune trial restored or copied by PBT), local or in
    cluster storage.
    """
    checkpoint = latest or initial
    if checkpoint is None:
        return None
    with _local_folder(checkpoint) as folder:
        engine.load(folder)
        return json.loads((folder / STATE_FILE).read_text()) | {"source": checkpoint.path}


@contextmanager
def _local_folder(checkpoint: ray.train.Checkpoint):
    """The checkpoint as a local folder: in place when it is local, else downloaded into this rank's own folder.

    Not Ray's `as_directory`: it shares one download between the ranks of a node and deletes it when the first rank
    is done, under a rank that is still waiting for it.
    """
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="steward-restore-") as folder:
        yield Path(checkpoint.to_directory(folder))


def consolidate_checkpoint(folder: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 weights (and buffers) in a checkpoint folder, whatever the strategy that wrote it.

    ZeRO >= 1 checkpoints hold fp32 master weights split across ranks' files; DeepSpeed's own zero_to_fp32
    stitches them together on the CPU, with no process group and no GPU.
    """
    if (folder / "ddp_state.pt").exists():
        return torch.load(folder / "ddp_state.pt", map_location="cpu", weights_only=True)["model"]
    if zero_stage == 0:
        states = torch.load(folder / "state" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="state")
