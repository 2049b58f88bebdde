"""The run's one owner: every way a run ends is recorded in status.json and the audit log before the CLI answers,
and each kind of error ends as its family says (user error 2, failed run 1, Ctrl-C 130, a bug 1 with its traceback
in a log file). The stages are replaced where a failure is injected; nothing here starts Ray."""

import json

import pytest
from typer.testing import CliRunner

from steward import pipeline
from steward.cli import app
from steward.errors import RunFailed, RunInterrupted
from steward.govern.audit import history, log_path, verify
from tests.conftest import JOBS


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def only_run(output_dir):
    (status,) = output_dir.glob("*/*/status.json")
    return status.parent, json.loads(status.read_text())


def events(output_dir):
    """The run's own audit events (admitting the spec is audited too, before the run starts)."""
    return [e["event"] for e in history(log_path(output_dir)) if e["event"].startswith("run.")]


@pytest.fixture
def spec(tmp_path):
    return [JOBS / "quickstart.yaml", "--set", f"output_dir={tmp_path}"]


def test_ctrl_c_during_training_ends_the_run_as_interrupted_with_the_resume_command(monkeypatch, tmp_path, spec):
    def interrupted(job, run_dir, address):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_model", interrupted)
    out = run_cli("train", *spec)
    run_dir, status = only_run(tmp_path)
    assert out.exit_code == 130, out.output
    assert status["state"] == "interrupted" and "error" not in status
    assert f"steward train SPEC --resume {run_dir}" in out.output
    assert events(tmp_path) == ["run.started", "run.interrupted"] and verify(log_path(tmp_path)).ok


def test_a_bug_inside_a_run_is_failed_with_its_traceback_in_the_runs_log(monkeypatch, tmp_path, spec):
    def bug(job, run_dir, address):
        return {}["overall"]  # a KeyError: steward's own mistake, not the user's

    monkeypatch.setattr(pipeline, "train_model", bug)
    out = run_cli("train", *spec)
    run_dir, status = only_run(tmp_path)
    assert out.exit_code == 1 and "bug: KeyError" in out.output and "not in your input" in out.output
    log = run_dir / pipeline.RUN_LOG
    assert str(log) in out.output.replace("\n", "")
    assert "Traceback" in log.read_text() and "KeyError" in log.read_text()
    assert status["state"] == "failed" and status["error"] == "'overall'"
    assert events(tmp_path) == ["run.started", "run.failed"]


def test_a_failed_run_says_why_in_one_line_without_a_traceback(monkeypatch, tmp_path, spec):
    class WorkerLost(RunFailed):
        what = "training failed"

    def failed(job, run_dir, address):
        raise WorkerLost("a worker was lost")

    monkeypatch.setattr(pipeline, "train_model", failed)
    out = run_cli("train", *spec)
    run_dir, status = only_run(tmp_path)
    assert out.exit_code == 1 and "training failed: a worker was lost" in out.output
    assert "Traceback" not in out.output and not (run_dir / pipeline.RUN_LOG).exists()
    assert status["state"] == "failed" and status["error"] == "a worker was lost"


def test_an_unfinished_sweep_is_interrupted_not_failed(monkeypatch, tmp_path):
    def unfinished(job, run_dir, address, resume):
        raise RunInterrupted(f"sweep interrupted; continue it with: steward tune SPEC --resume {run_dir}")

    monkeypatch.setattr(pipeline, "tune_job", unfinished)
    out = run_cli("tune", JOBS / "tune-digits-asha.yaml", "--set", f"output_dir={tmp_path}")
    run_dir, status = only_run(tmp_path)
    assert out.exit_code == 130 and f"--resume {run_dir}" in out.output
    assert status["state"] == "interrupted"
    assert events(tmp_path) == ["run.started", "run.interrupted"]


def test_a_succeeded_run_is_published_and_audited_once_with_its_kind(monkeypatch, tmp_path, spec):
    def trained(job, run_dir, address):
        return {"split": "test", "num_samples": 1, "overall": {"accuracy": 1.0}}

    monkeypatch.setattr(pipeline, "train_model", trained)
    out = run_cli("train", *spec)
    _, status = only_run(tmp_path)
    assert out.exit_code == 0, out.output
    assert status["state"] == "succeeded" and status["headline"] == {"accuracy": 1.0}
    finished = [e for e in history(log_path(tmp_path)) if e["event"] == "run.finished"]
    assert len(finished) == 1 and finished[0]["kind"] == "train"


def test_a_bug_outside_a_run_points_at_a_log_in_stewards_cache(monkeypatch, tmp_path):
    import steward.runs

    def bug(output_dir):
        raise KeyError("state")

    monkeypatch.setattr(steward.runs, "list_runs", bug)
    monkeypatch.setenv("STEWARD_CACHE", str(tmp_path / "cache"))
    out = run_cli("runs", "--output-dir", tmp_path)
    (log,) = (tmp_path / "cache" / "errors").glob("*.log")
    assert out.exit_code == 1 and "bug: KeyError" in out.output and "KeyError: 'state'" in log.read_text()


def test_a_library_value_error_is_a_bug_not_a_user_error(monkeypatch, tmp_path, spec):
    # ValueError used to mean "the user's input is wrong" (exit 2, no traceback); now only StewardError does.
    def bug(job, run_dir, address):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(pipeline, "train_model", bug)
    out = run_cli("train", *spec)
    assert out.exit_code == 1 and "bug: ValueError" in out.output
