"""Checkpoints through Ray Train: every rank's engine state plus where the loop was, and the resume path.

Two promises beyond Ray's own:
- Loading a checkpoint runs no code from it. DeepSpeed unpickles its files with torch.load(weights_only=False), so a
  file planted in shared storage would run on every worker that resumes from it. Every load here goes through
  torch's weights-only unpickler, which builds tensors, plain containers and the few types DeepSpeed's files are
  made of (`deepspeed_types`), and nothing else.
- A resume continues from the newest complete checkpoint. Ray records a checkpoint only when its controller takes
  the workers' report, which can trail the files written by two reports; a run stopped in between has newer
  checkpoints on disk than Ray's latest. Each saving rank writes a manifest of its files, so a checkpoint whose
  every manifest and file is there counts, and one cut short while it was written does not.
"""

import json
import os
import pickle
import posixpath
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import torch

from steward.errors import StewardError

STATE_FILE = "steward_state.json"
MANIFEST = "steward_rank_{}.json"  # a saving rank's files and sizes, and which ranks save
DEEPSPEED_TAG = "state"  # the folder DeepSpeed writes its files into (its checkpoint `tag`)
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it holds
FORCE_WEIGHTS_ONLY, FORCE_PICKLE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class CheckpointRefused(StewardError):
    """A checkpoint file holds something besides tensors and DeepSpeed's own types: it is not loaded."""


@contextmanager
def checkpoint_dir(engine: Any, rank: int, world: int, loop_state: dict):
    """Yield a ray.train.Checkpoint (or None on ranks with nothing to save) holding the engine and loop state."""
    if rank != 0 and not engine.every_rank_saves:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="steward-ckpt-") as folder:
        root = Path(folder)
        engine.save(root)
        if rank == 0:
            (root / STATE_FILE).write_text(json.dumps(loop_state))
        files = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
        savers = list(range(world)) if engine.every_rank_saves else [0]
        (root / MANIFEST.format(rank)).write_text(json.dumps({"savers": savers, "files": files}))
        yield ray.train.Checkpoint.from_directory(folder)


def restore(
    engine: Any, latest: ray.train.Checkpoint | None, initial: ray.train.Checkpoint | None = None
) -> dict | None:
    """Load the checkpoint to continue from and return its loop state (with `source`: where it came from).

    Ray's own latest checkpoint of this run (a restart after a worker failure, a --resume) wins, or a newer complete
    one beside it (`newest_complete`); otherwise `initial`, a checkpoint handed in from outside (a Tune trial restored
    or copied by PBT), local or in cluster storage.
    """
    checkpoint = newest_complete(latest) if latest else initial
    if checkpoint is None:
        return None
    with _local_folder(checkpoint) as folder, loading_without_code(folder):
        engine.load(folder)
        return json.loads((folder / STATE_FILE).read_text()) | {"source": checkpoint.path}


def newest_complete(latest: ray.train.Checkpoint) -> ray.train.Checkpoint:
    """Ray's latest checkpoint, or the newest complete checkpoint beside it that Ray had not recorded yet.

    Every rank picks the same one: they all look at once, while no rank writes.
    """
    fs, parent = latest.filesystem, posixpath.dirname(latest.path.rstrip("/"))
    try:
        recorded = (_read_json(fs, f"{latest.path}/{STATE_FILE}")["epoch"], latest.path)
    except (OSError, ValueError, KeyError):  # written before manifests: Ray's latest is then the newest known
        return latest
    best = _newest_complete_in(fs, parent, recorded)
    return latest if best == latest.path else ray.train.Checkpoint(best, filesystem=fs)


def _newest_complete_in(fs: pyarrow.fs.FileSystem, parent: str, floor: tuple[int, str] = (-1, "")) -> str:
    """The path of the newest complete checkpoint in `parent` (by epoch, then name), or `floor`'s when none is newer
    ("" with no floor)."""
    complete = [
        (state["epoch"], path) for path in _checkpoint_folders(fs, parent) if (state := complete_state(fs, path))
    ]
    return max([floor, *complete])[1]


def complete_state(fs: pyarrow.fs.FileSystem, path: str) -> dict | None:
    """The loop state of the checkpoint at `path` when every saving rank's manifest and files are there, else None."""
    try:
        first = _read_json(fs, f"{path}/{MANIFEST.format(0)}")
        manifests = [first] + [_read_json(fs, f"{path}/{MANIFEST.format(r)}") for r in first["savers"] if r != 0]
        found = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
        sizes = {info.path: info.size for info in found if info.type == pyarrow.fs.FileType.File}
        if any(sizes.get(f"{path}/{name}") != size for m in manifests for name, size in m["files"].items()):
            return None
        state = _read_json(fs, f"{path}/{STATE_FILE}")
        return state if isinstance(state.get("epoch"), int) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, cut short, or not ours
        return None


def prune_unrecorded(storage: str) -> list[str]:
    """Delete the checkpoints in a Train run's storage folder that Ray does not hold; return their paths.

    Ray keeps `train.checkpoint.keep` of the checkpoints it records and never sees those an interruption left
    behind unrecorded (or half-written), so they are deleted here, once the run has finished and nothing writes.
    Without a readable record of Ray's, nothing is deleted.
    """
    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage)
        snapshot = _read_json(fs, f"{root}/{SNAPSHOT}")
        results = [*snapshot["checkpoint_results"], snapshot.get("latest_checkpoint_result") or {}]
        recorded = {r["checkpoint_dir_name"] for r in results if r}
        doomed = [p for p in _checkpoint_folders(fs, root) if posixpath.basename(p) not in recorded]
        for path in doomed:
            fs.delete_dir(path)
    except (OSError, ValueError, KeyError, TypeError):  # housekeeping: a trained run does not fail on it
        return []
    return doomed


def resume_point(storage: str) -> ray.train.Checkpoint | None:
    """The checkpoint a run resumed into `storage` (a Train run's storage folder) continues from, or None.

    Ray's latest record, or a newer complete checkpoint beside it; with no record at all (Ctrl-C before Ray had
    taken the first report), the newest complete checkpoint there.
    """
    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    try:
        name = _read_json(fs, f"{root}/{SNAPSHOT}")["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):
        path = _newest_complete_in(fs, root)
        return ray.train.Checkpoint(path, filesystem=fs) if path else None
    return newest_complete(ray.train.Checkpoint(f"{root}/{name}", filesystem=fs))


def unrecorded_start(storage: str) -> ray.train.Checkpoint | None:
    """The checkpoint to hand the workers when Ray holds no record of the run's own (None when it does)."""
    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    if fs.get_file_info(f"{root}/{SNAPSHOT}").type != pyarrow.fs.FileType.NotFound:
        return None
    start = resume_point(storage)
    if start is None and _checkpoint_folders(fs, root):
        raise StewardError(
            f"--resume: every checkpoint in {storage} was cut short as the run stopped, so there is nothing "
            "to continue from; start a new run (without --resume)"
        )
    return start


def check_resumable(storage: str) -> None:
    """Refuse the checkpoint a resume would load, before any worker starts, when a file in it would run code.

    Local storage only: the workers check every checkpoint they load anyway, and this spares a refused resume the
    start of its workers (and their restarts, distributed.max_failures of them).
    """
    fs, _ = pyarrow.fs.FileSystem.from_uri(storage)
    chosen = resume_point(storage) if isinstance(fs, pyarrow.fs.LocalFileSystem) else None
    if chosen is not None:
        with loading_without_code(Path(chosen.path)):  # scans the files, unpickles none
            pass


def _checkpoint_folders(fs: pyarrow.fs.FileSystem, parent: str) -> list[str]:
    found = fs.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
    folders = (i.path for i in found if i.type == pyarrow.fs.FileType.Directory)
    return sorted(p for p in folders if posixpath.basename(p).startswith("checkpoint_"))


def _read_json(fs: pyarrow.fs.FileSystem, path: str) -> dict:
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read().decode())


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


def deepspeed_types() -> list[Any]:
    """What DeepSpeed 0.19 pickles into its checkpoint files besides tensors and plain containers: the loss scaler,
    the ZeRO stage, the fragment addresses of ZeRO-1/2. The weights-only unpickler builds them from plain values
    and calls none of their methods."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def loading_without_code(folder: Path):
    """Inside, every torch.load of this process uses the weights-only unpickler, whatever its caller asks.

    DeepSpeed's loaders (its engine's and zero_to_fp32's) pass weights_only=False themselves, and torch's
    TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides a call site; it is set only while the checkpoint loads, when this
    process loads nothing else. Raises CheckpointRefused naming the file and what it would have run.
    """
    allowed: list[Any] = deepspeed_types() if (folder / DEEPSPEED_TAG).is_dir() else []
    saved = {name: os.environ.pop(name, None) for name in (FORCE_WEIGHTS_ONLY, FORCE_PICKLE)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            _refuse_foreign_globals(folder)
            yield
    except pickle.UnpicklingError as err:  # a file the scan cannot read (torch's legacy format) refused on load
        found = re.search(r"GLOBAL ([\w.]+)", str(err))  # torch names the global it refused
        lines = [line for line in str(err).splitlines() if line.strip()][1:2]  # else its reason, after a preamble
        what = found.group(1) if found else f"what torch refuses ({lines[0] if lines else err})"
        raise CheckpointRefused(_refusal(folder, what)) from None
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _refuse_foreign_globals(folder: Path) -> None:
    """Name the first file that would import anything unexpected, before any of them is unpickled."""
    for path in sorted(folder.rglob("*.pt")):
        try:
            foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except (ValueError, RuntimeError, OSError):  # not a zip checkpoint: the weights-only load itself judges it
            continue
        if foreign:
            raise CheckpointRefused(_refusal(path, ", ".join(sorted(foreign))))


def _refusal(where: Path, what: str) -> str:
    return (
        f"checkpoint {where}: refused: unpickling it would call {what}, and a checkpoint holds only tensors, plain "
        "values and DeepSpeed's own types; it was altered after it was saved (or not saved by steward). Resume "
        "from a checkpoint you trust, or start a new run"
    )


def consolidate_checkpoint(folder: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 weights (and buffers) in a checkpoint folder, whatever the strategy that wrote it.

    ZeRO >= 1 checkpoints hold fp32 master weights split across ranks' files; DeepSpeed's own zero_to_fp32
    stitches them together on the CPU, with no process group and no GPU.
    """
    with loading_without_code(folder):
        if (folder / "ddp_state.pt").exists():
            return torch.load(folder / "ddp_state.pt", map_location="cpu", weights_only=True)["model"]
        if zero_stage == 0:
            model_states = folder / DEEPSPEED_TAG / "mp_rank_00_model_states.pt"
            states = torch.load(model_states, map_location="cpu", weights_only=True)
            return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_TAG)
        except RuntimeError as err:  # zero_to_fp32 memory-maps its files, which torch's legacy format cannot be
            if "mmap can only be used" not in str(err):
                raise
            raise StewardError(
                f"checkpoint {folder}: a file in it is in torch's legacy format, which DeepSpeed's zero_to_fp32 "
                "cannot read (DeepSpeed writes zip files); it was altered after it was saved, or saved with "
                "another checkpoint serialization: evaluate the run's model folder instead"
            ) from None
