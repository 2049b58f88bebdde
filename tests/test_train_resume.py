"""Restarts and resumes as a user meets them: a worker killed mid-run, Ctrl-C on `steward train`, then --resume; the
run ends where an uninterrupted one does, recorded as interrupted in between, keeping train.checkpoint.keep."""

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import time

import pytest

from steward.runs import create_run
from steward.spec import load_job
from steward.stages import train_model
from steward.train.checkpoint import SNAPSHOT, complete_state
from tests.conftest import JOBS, ROOT, STEWARD, own_processes

pytestmark = pytest.mark.slow

EPOCHS = 12  # the restarted workers reach epoch 6 and are interrupted with 6 epochs to spare
# A constant schedule, no early stopping: the resumed run's last epoch is comparable with the uninterrupted one's.
# SGD without dropout, as in test_train's DDP comparison: a restore reproduces the state to ~1e-7, and Adam's
# sign-like first steps would grow that into percents over hundreds of steps; SGD's update is linear in it.
COMMON = ["data.batch_size=16", "train.log_every_steps=1", "train.scheduler.warmup_steps=0", "distributed.zero_stage=2",
          "train.early_stopping=null", "train.scheduler.name=constant", f"train.epochs={EPOCHS}",
          "distributed.max_failures=1", "train.checkpoint.keep=2", "train.optimizer.name=sgd",
          "train.optimizer.lr=0.05", "model.params.dropout=0"]  # fmt: skip


def wait_for(found, what, seconds=300):
    deadline = time.monotonic() + seconds
    while not (value := found()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return value


def history(run_dir):
    """The run's history.jsonl records; a line rank 0 is writing as it is read waits for the next look."""
    path, records = run_dir / "history.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def reached(run_dir, attempt):
    """The last epoch the `attempt`-th start (1: the first) of the run has logged, 0 before it starts."""
    records, starts = history(run_dir), 0
    epoch = 0
    for record in records:
        starts += record["kind"] == "start"
        if starts == attempt and record["kind"] == "epoch":
            epoch = record["epoch"]
    return epoch


def checkpoints(run_dir):
    """{folder: epoch} of the complete checkpoints in the run, and every checkpoint folder's name."""
    import pyarrow.fs

    folders = sorted(p for p in (run_dir / "train").glob("checkpoint_*") if p.is_dir())
    states = {p: complete_state(pyarrow.fs.LocalFileSystem(), str(p)) for p in folders}
    return {p: s["epoch"] for p, s in states.items() if s}, [p.name for p in folders]


def test_a_killed_worker_then_ctrl_c_then_resume_ends_where_an_uninterrupted_run_does(ray_local, tmp_path):
    address = ray_local.get_runtime_context().gcs_address  # this test's own Ray: its workers are ours to signal
    cli = [*STEWARD, "train", str(JOBS / "quickstart.yaml"), "--address", address,
           *(f"--set={o}" for o in [f"output_dir={tmp_path / 'runs'}", *COMMON])]  # fmt: skip
    training = subprocess.Popen(cli, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        found = lambda: next((tmp_path / "runs" / "quickstart").glob("*/spec.yaml"), None)  # noqa: E731
        run_dir = wait_for(found, "no run folder").parent
        wait_for(lambda: reached(run_dir, 1) >= 2, "training never reached epoch 2")
        workers = own_processes("ray::RayTrainWorker")
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)  # Ray restarts the workers from the last checkpoint
        wait_for(lambda: reached(run_dir, 2) >= 6, "the restarted workers never reached epoch 6")
        training.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = training.communicate(timeout=300)
    finally:
        if training.poll() is None:
            training.kill()
            training.wait()
    assert training.returncode == 130, err[-3000:]
    assert "--resume" in err and "Traceback" not in err, err[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    logged = reached(run_dir, 2)
    complete, _ = checkpoints(run_dir)
    newest = max(complete.values())
    assert newest >= logged - 1, (logged, complete)  # at most one checkpoint (train.checkpoint.every_epochs) lost
    # A checkpoint cut short as the process died (rank 1's files never arrived) is newer, but not loaded.
    cut_short = run_dir / "train" / "checkpoint_9999-01-01_00-00-00.000000"
    shutil.copytree(max(complete, key=complete.get), cut_short)
    (cut_short / "steward_state.json").write_text(json.dumps({"epoch": EPOCHS - 1, "best": None, "stale": 0}))
    (cut_short / "steward_rank_1.json").unlink()

    resumed = subprocess.run([*cli, "--resume", str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = history(run_dir)
    starts = [r["epoch"] for r in records if r["kind"] == "start"]
    assert len(starts) == 3 and starts[0] == 0 and starts[1] >= 1 and starts[2] == newest, starts  # from checkpoints
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(1, EPOCHS + 1))  # what lost attempts logged was rewound
    assert json.loads((run_dir / "status.json").read_text())["state"] == "succeeded"
    # Retention across the interruption: the two Ray records (the last one final), nothing it did not record.
    complete, names = checkpoints(run_dir)
    recorded = json.loads((run_dir / "train" / SNAPSHOT).read_text())["checkpoint_results"]
    assert names == sorted(r["checkpoint_dir_name"] for r in recorded) and len(names) == 2, names
    assert len(complete) == 2 and max(complete.values()) == EPOCHS, complete

    spec = load_job(JOBS / "quickstart.yaml", [f"output_dir={tmp_path / 'straight'}", *COMMON])
    straight_dir = create_run(spec)
    train_model(spec, straight_dir)
    straight = [r for r in history(straight_dir) if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs] == [r["step"] for r in straight]
    for ours, theirs in zip(epochs, straight, strict=True):  # every epoch, those replayed after restarts included
        for metric in ("train_loss", "val_loss"):
            assert math.isclose(ours[metric], theirs[metric], rel_tol=1e-5), (metric, ours, theirs)
