"""Submission without a cluster: what a job carries (spec, inputs, project, pinned requirements), and the errors a
user meets before anything leaves the machine (bad address, relative output_dir, package too large, wrong stage)."""

import importlib.metadata
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import steward
from steward.cli import app
from steward.cluster import package as packaging
from steward.cluster.jobs import entrypoint, jobs_address
from steward.cluster.package import package_job, requirements
from steward.errors import StewardError
from steward.spec import load_job
from tests.conftest import JOBS

UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing listens there


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def csv_job(tmp_path):
    """A spec reading a local CSV through a relative path, as users write them."""
    data = tmp_path / "project" / "data"
    data.mkdir(parents=True)
    (data / "reviews.csv").write_text("text,label\ngood,1\nbad,0\n" * 20)
    raw = {
        "name": "reviews",
        "output_dir": str(tmp_path / "shared" / "runs"),
        "data": {"source": "file:data/reviews.csv", "input_column": "text", "label_column": "label"},
        "model": {"family": "lstm", "params": {"hidden_size": 8}},
    }
    path = tmp_path / "project" / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_package_carries_the_spec_its_inputs_and_the_project(csv_job):
    package = package_job(load_job(csv_job), deps="pip")
    try:
        remote = yaml.safe_load((package.workdir / "spec.yaml").read_text())
        source = remote["data"]["source"]
        assert source.startswith("file:inputs/") and source.endswith("reviews.csv")  # relative: resolved on the cluster
        assert (package.workdir / source.removeprefix("file:")).read_text().startswith("text,label")
        env = package.runtime_env
        assert env["working_dir"] == str(package.workdir)
        assert env["py_modules"] == [str(Path(steward.__file__).resolve().parent)]
        assert "__pycache__" in env["excludes"] and "runs" in env["excludes"]
        pins = env["pip"]["packages"]
        assert f"pydantic=={importlib.metadata.version('pydantic')}" in pins
        assert not any(p.startswith("ray") for p in pins)  # the cluster's Ray must match its head: never reinstalled
        assert 0 < package.size_bytes < packaging.PACKAGE_LIMIT
    finally:
        package.cleanup()
    assert not package.workdir.exists()


def test_preinstalled_deps_ship_no_requirements(csv_job):
    package = package_job(load_job(csv_job), deps="preinstalled")
    package.cleanup()
    assert "pip" not in package.runtime_env


def test_requirements_pin_the_local_versions_without_local_labels():
    pins = dict(p.split("==") for p in requirements())
    assert pins["numpy"] == importlib.metadata.version("numpy")
    assert "+" not in pins["torch"]  # torch==2.13.0+cpu names this machine's wheel; the cluster's index picks its own
    assert not {"moto", "psutil", "pytest"} & set(pins)  # what only the tests use is never installed on the cluster


def test_relative_output_dir_is_refused_with_the_fix(csv_job):
    with pytest.raises(StewardError, match=r"output_dir 'runs' is relative.*--storage"):
        package_job(load_job(csv_job, ["output_dir=runs"]))


def test_a_package_above_rays_limit_fails_clearly(csv_job, monkeypatch):
    monkeypatch.setattr(packaging, "PACKAGE_LIMIT", 1000)
    with pytest.raises(StewardError, match=r"above Ray's runtime_env limit of .*largest files: .*shared storage"):
        package_job(load_job(csv_job))


def test_unreachable_address_is_a_message_not_a_traceback(tmp_path):
    out = invoke("submit", JOBS / "quickstart.yaml", "--address", UNREACHABLE, "--storage", tmp_path)
    assert out.exit_code == 2
    assert f"--address {UNREACHABLE}: cannot reach a Ray Jobs API there" in out.output
    assert "Traceback" not in out.output
    for command in (["jobs", "list"], ["jobs", "status", "raysubmit_x"], ["jobs", "logs", "x"], ["jobs", "stop", "x"]):
        out = invoke(*command, "--address", UNREACHABLE)
        assert out.exit_code == 2 and "cannot reach a Ray Jobs API" in out.output, command


def test_stage_without_its_section_is_refused_before_submitting(tmp_path):
    out = invoke("submit", JOBS / "quickstart.yaml", "--stage", "tune", "--storage", tmp_path, "--address", UNREACHABLE)
    assert out.exit_code == 2 and "no `tune` section" in out.output
    out = invoke("submit", JOBS / "quickstart.yaml", "--stage", "deploy", "--address", UNREACHABLE)
    assert out.exit_code == 2 and "stage is train|tune|serve|run" in out.output


def test_invalid_spec_is_refused_locally(tmp_path):
    out = invoke("submit", JOBS / "quickstart.yaml", "--set", "train.epochz=2", "--address", UNREACHABLE)
    assert out.exit_code == 2 and "did you mean `epochs`?" in out.output


def test_address_and_entrypoints(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not the Jobs API
    assert jobs_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert jobs_address(None) == "http://head:8265" and jobs_address("head:9000") == "http://head:9000"
    assert entrypoint("train") == "python -m steward train spec.yaml --address auto"
    assert entrypoint("serve", 8001).endswith("serve deploy spec.yaml --address auto --host 0.0.0.0 --port 8001")


def test_runs_lists_cluster_storage_through_a_uri(tmp_path):
    spec = load_job(JOBS / "quickstart.yaml", [f"output_dir={tmp_path}"])
    from steward.runs import create_run, set_status

    run_dir = create_run(spec)
    set_status(run_dir, "succeeded")
    (run_dir / "metrics.json").write_text('{"overall": {"accuracy": 0.875}}')
    for storage in (f"file://{tmp_path}", str(tmp_path)):
        out = invoke("runs", "--storage", storage)
        assert out.exit_code == 0 and run_dir.name in out.output and "accuracy=0.8750" in out.output, storage


@pytest.mark.parametrize("command", [["submit"], ["jobs"], ["jobs", "logs"], ["k8s"]])
def test_help(command):
    out = invoke(*command, "--help")
    assert out.exit_code == 0 and "Usage" in out.output


def test_a_lost_worker_with_no_restarts_left_names_max_failures_and_the_fix():
    from ray.train import WorkerGroupError

    from steward.train.launch import explain_failure

    # What the surviving rank reported when its peer's node died (seen on the two-node cluster).
    reset = RuntimeError("[pair.cc:537] Read error [127.0.0.1]:47786: Connection reset by peer.")
    lost = WorkerGroupError(f"RuntimeError: {reset}", {0: reset})  # Ray's message carries the rank's error
    spec = load_job(JOBS / "quickstart.yaml", ["distributed.max_failures=2"])
    message = explain_failure(lost, spec)
    assert message.startswith("a worker was lost (its process or node died: WorkerGroupError: RuntimeError: [pair")
    assert "distributed.max_failures=2 restarts were all used" in message
    assert "raise distributed.max_failures" in message
    bug = WorkerGroupError("ValueError: shapes do not match", {0: ValueError("shapes do not match")})
    assert explain_failure(bug, spec) == "WorkerGroupError: ValueError: shapes do not match"  # a bug stays itself


def test_a_failed_job_leads_with_stewards_own_error_line_not_rays_noise():
    from types import SimpleNamespace

    from steward.cluster.jobs import failure

    log = "\n".join(
        [
            "epoch 1",
            "training failed: a worker was lost (...)",
            "[state-dump] Pull - 1 total",
            "[2026-11-22 20:01:11,952 I 1487 1487] (raylet) worker_pool.cc:564: Started worker",
        ]
    )
    reason = "Job entrypoint command failed with exit code 1"
    info = SimpleNamespace(
        submission_id="steward-q-train-1",
        job_id=None,
        status="FAILED",
        message=f"{reason}, last available logs (truncated): [state-dump] x",
    )
    text = str(failure(info, log))
    first = text.splitlines()[0]
    assert first == f"job steward-q-train-1 FAILED: training failed: a worker was lost (...) ({reason})"
    assert "state-dump" not in text and "(raylet)" not in text and "  | epoch 1" in text


def test_the_jobs_api_client_sends_rays_token_as_rays_own_clients_do(monkeypatch, tmp_path):
    from steward.cluster.jobs import ray_auth_header

    token_file = tmp_path / "auth_token"
    token_file.write_text("from-file\n")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert ray_auth_header() == {"Authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert ray_auth_header() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_auth_header() == {}
