"""Checkpoints through Ray Train: every rank's engine state plus where the loop was, and the resume path."""

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray.train

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


def restore(engine: Any) -> dict | None:
    """Load the latest checkpoint Ray hands this worker (resume or restart after a failure); its loop state."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        engine.load(Path(folder))
        return json.loads((Path(folder) / STATE_FILE).read_text())
