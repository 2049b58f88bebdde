"""Checkpoints that cannot run code, and which checkpoint a resume takes: a real ZeRO-2 checkpoint of a one-rank
DeepSpeed engine (made in a subprocess with a process group of its own), tampered with as an attacker with write
access to shared storage would."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.fs
import pytest
import ray.train
import torch

from tests.conftest import JOBS, ROOT, STEWARD

pytestmark = pytest.mark.slow

OVERRIDES = ["distributed.num_workers=1", "distributed.zero_stage=2", "data.batch_size=16"]
NAME = "checkpoint_2026-01-01_00-00-0{}.000000"  # the names Ray Train gives its checkpoints, in time order
STATE = "state/mp_rank_00_model_states.pt"  # read by a resume (the engine) and by evaluate (zero_to_fp32)


class Payload:
    """What an attacker plants: unpickling it runs a shell command that leaves `marker` behind."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def run(*args, timeout=600):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A run folder holding one real checkpoint (epoch 1) that Ray Train's record names as its latest."""
    out = tmp_path_factory.mktemp("made")
    done = run(sys.executable, "-m", "tests.test_checkpoint_integrity", "make", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def run_dir(made, tmp_path):
    copy = tmp_path / made.parent.name / made.name  # <output_dir>/<name>/<run-id>, as a resume wants it
    shutil.copytree(made, copy)
    return copy


def plant(file: Path, marker: Path, legacy: bool = False) -> None:
    """Add the payload to a checkpoint file, in torch's zip format or its legacy one (which no scan reads)."""
    state = torch.load(file, map_location="cpu", weights_only=False)  # our own file, just made
    torch.save(state | {"extra": Payload(marker)}, file, _use_new_zipfile_serialization=not legacy)
    # The payload is live: a plain torch.load, as DeepSpeed's own loaders do it, runs it.
    loaded = run(sys.executable, "-c", f"import torch; torch.load({str(file)!r}, weights_only=False)")
    assert loaded.returncode == 0 and marker.exists(), loaded.stderr[-2000:]
    marker.unlink()


def test_a_planted_pickle_runs_nothing_on_resume_or_evaluate(run_dir, tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = run_dir / "train" / NAME.format(1)
    plant(checkpoint / STATE, marker)
    resumed = run(*STEWARD, "train", str(JOBS / "quickstart.yaml"), "--resume", str(run_dir),
                  *(f"--set={o}" for o in [f"output_dir={run_dir.parent.parent}", *OVERRIDES]))  # fmt: skip
    evaluated = run(*STEWARD, "evaluate", str(checkpoint))
    for done in (resumed, evaluated):
        assert done.returncode == 2, done.stderr[-3000:]
        message = " ".join(done.stderr.split())
        assert f"{checkpoint / STATE}: refused: unpickling it would call posix.system" in message, message
        assert "Traceback" not in done.stderr
    assert not marker.exists()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"  # the refused resume, recorded


def test_a_pickle_no_scan_reads_is_refused_by_the_load_itself(run_dir, tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = run_dir / "train" / NAME.format(1)
    plant(checkpoint / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker, legacy=True)
    restored = run(sys.executable, "-m", "tests.test_checkpoint_integrity", "restore", str(checkpoint))
    assert restored.returncode == 2, restored.stdout[-2000:] + restored.stderr[-3000:]
    message = " ".join(restored.stdout.split())
    assert f"{checkpoint}: refused: unpickling it would call posix.system" in message, message
    # evaluate's zero_to_fp32 memory-maps the files, so it stops at the legacy format before unpickling anything
    evaluated = run(*STEWARD, "evaluate", str(checkpoint))
    assert evaluated.returncode == 2 and "Traceback" not in evaluated.stderr, evaluated.stderr[-3000:]
    assert f"{checkpoint}: a file in it is in torch's legacy format" in " ".join(evaluated.stderr.split())
    assert not marker.exists()


def copy_as(run_dir: Path, index: int, epoch: int) -> Path:
    """Another checkpoint beside the first, as a later epoch would have left it."""
    folder = run_dir / "train" / NAME.format(index)
    shutil.copytree(run_dir / "train" / NAME.format(1), folder)
    (folder / "steward_state.json").write_text(json.dumps({"epoch": epoch, "best": None, "stale": 0}))
    manifest = json.loads((folder / "steward_rank_0.json").read_text())
    manifest["files"]["steward_state.json"] = (folder / "steward_state.json").stat().st_size
    (folder / "steward_rank_0.json").write_text(json.dumps(manifest))
    return folder


def test_a_resume_takes_the_newest_complete_checkpoint_and_the_finished_run_deletes_the_unrecorded(run_dir):
    from steward.train.checkpoint import newest_complete, prune_unrecorded

    latest = ray.train.Checkpoint(str(run_dir / "train" / NAME.format(1)), filesystem=pyarrow.fs.LocalFileSystem())
    copy_as(run_dir, 2, epoch=2)
    newer = copy_as(run_dir, 3, epoch=3)  # written, but Ray had not recorded it when the run stopped
    assert newest_complete(latest).path == str(newer)
    cut_short = copy_as(run_dir, 4, epoch=4)
    with (cut_short / STATE).open("r+b") as file:  # the process died while it was being written
        file.truncate(100)
    no_rank = copy_as(run_dir, 5, epoch=5)
    manifest = json.loads((no_rank / "steward_rank_0.json").read_text())
    (no_rank / "steward_rank_0.json").write_text(json.dumps(manifest | {"savers": [0, 1]}))  # rank 1 never wrote
    assert newest_complete(latest).path == str(newer)
    shutil.rmtree(no_rank)
    (cut_short / "steward_rank_0.json").unlink()
    assert newest_complete(latest).path == str(newer)

    deleted = prune_unrecorded(str(run_dir / "train"))
    left = sorted(p.name for p in (run_dir / "train").glob("checkpoint_*") if p.is_dir())
    assert left == [NAME.format(1)] and len(deleted) == 3  # Ray's record names only the first


def test_with_no_record_of_rays_the_newest_complete_checkpoint_is_the_start(run_dir):
    from steward.errors import StewardError
    from steward.runs import read_spec, resume_run
    from steward.train.checkpoint import SNAPSHOT, resume_point, unrecorded_start

    storage = str(run_dir / "train")
    assert unrecorded_start(storage) is None  # Ray recorded checkpoint 1: the workers get it from Ray
    (run_dir / "train" / SNAPSHOT).unlink()  # Ctrl-C before Ray took the first report
    complete = copy_as(run_dir, 2, epoch=2)
    cut_short = copy_as(run_dir, 3, epoch=3)
    (cut_short / "steward_rank_0.json").unlink()
    assert resume_point(storage).path == unrecorded_start(storage).path == str(complete)
    resume_run(read_spec(run_dir), str(run_dir), "train")  # --resume takes it
    for folder in (run_dir / "train").glob("checkpoint_*"):
        (folder / "steward_rank_0.json").unlink(missing_ok=True)
    with pytest.raises(StewardError, match="every checkpoint .* was cut short"):
        unrecorded_start(storage)


# ---- run as a subprocess: a DeepSpeed engine in a one-rank process group of its own, not in pytest's process ----


def _engine(out: Path | None, run_dir: Path | None = None):
    from steward.data import DataInfo
    from steward.models import build_model
    from steward.spec import load_job
    from steward.train.session import trial_session
    from steward.train.strategy import build_engine

    session = trial_session(use_gpu=False)
    if run_dir is None:
        from steward.runs import create_run
        from steward.train.launch import prepare

        spec = load_job(JOBS / "quickstart.yaml", [f"output_dir={out}", *OVERRIDES])
        run_dir = create_run(spec)
        info = prepare(spec, run_dir)
    else:
        from steward.runs import read_spec

        spec, info = read_spec(run_dir), DataInfo.from_dict(json.loads((run_dir / "data_info.json").read_text()))
    return spec, info, run_dir, build_engine(build_model(spec.model, info), spec, 10, session.prepare_model)


def _make(out: Path) -> None:
    """One step of a one-rank ZeRO-2 engine, saved as the loop saves it, recorded as Ray Train records it."""
    from steward.data import load_splits
    from steward.models import task_loss
    from steward.train.checkpoint import SNAPSHOT, checkpoint_dir

    spec, info, run_dir, engine = _engine(out)
    batch = next(iter(load_splits(spec, info)["train"].batches(16)))
    engine.backward_step(task_loss(spec.model.task, engine(batch["inputs"], None).float(), batch["labels"]))
    with checkpoint_dir(engine, 0, 1, {"epoch": 1, "best": None, "stale": 0}) as saved:
        shutil.copytree(saved.path, run_dir / "train" / NAME.format(1))
    result = {"checkpoint_dir_name": NAME.format(1), "metrics": {"epoch": 1}}
    record = {"checkpoint_results": [result], "latest_checkpoint_result": result}
    (run_dir / "train" / SNAPSHOT).write_text(json.dumps(record))
    print(run_dir)


def _restore(checkpoint: Path) -> int:
    """The worker's restore (train_loop's), into a fresh engine, from `checkpoint` as Ray's latest."""
    from steward.errors import StewardError
    from steward.train.checkpoint import restore

    *_, engine = _engine(None, checkpoint.parent.parent)
    try:
        restore(engine, ray.train.Checkpoint(str(checkpoint), filesystem=pyarrow.fs.LocalFileSystem()))
    except StewardError as err:
        print(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_make(Path(sys.argv[2])) if sys.argv[1] == "make" else _restore(Path(sys.argv[2])))
