"""The policy on every path that launches or emits something: a spec is refused for what any of its trials or
bench cells would do (every grid point, both ends of every range, every matrix cell), by every command, and by the
library calls behind them; each refusal comes before a run folder, a cluster or Ray. No Ray starts here."""

import sys

import pytest
import yaml
from typer.testing import CliRunner

from steward import pipeline
from steward.cli import app
from steward.cluster import jobs
from steward.govern import audit
from steward.govern.policy import Policy, PolicyViolation, check_job
from steward.spec import load_job
from tests.conftest import JOBS

SEARCHED = "tune.search_space.distributed.num_workers"
TUNE = {"metric": "val_accuracy", "mode": "max", "search_space": {"distributed.num_workers": {"choice": [1, 16]}}}


def spec_file(tmp_path, **sections):
    raw = yaml.safe_load((JOBS / "digits-lstm.yaml").read_text()) | sections
    raw["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def policy(tmp_path, monkeypatch):
    monkeypatch.delenv("STEWARD_POLICY", raising=False)
    monkeypatch.setenv("COLUMNS", "250")
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"name": "small", "rules": {"max_workers": 8, "max_gpus": 2}}))
    return path


def said(out):
    """The CLI's words, whatever the console's width broke into lines."""
    return " ".join(out.output.split())


def refused_before_anything_ran(tmp_path, out, field):
    assert out.exit_code == 2, out.output
    assert f"policy rule `max_workers`: {field}" in said(out) and "over the limit of 8" in said(out)
    assert not any(p.is_dir() for p in (tmp_path / "runs").glob("*")), "a run folder was made"
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    [event] = audit.history(tmp_path / "runs" / "audit.jsonl")
    assert event["event"] == "policy.violation"


@pytest.mark.parametrize("command", ["validate", "train", "tune", "run", "submit", "k8s"])
def test_a_search_space_value_over_the_limit_is_refused_by_every_command(tmp_path, policy, command):
    spec = spec_file(tmp_path, tune=TUNE)
    out = CliRunner().invoke(app, [command, str(spec), "--policy", str(policy)])
    refused_before_anything_ran(tmp_path, out, SEARCHED)
    assert "with distributed.num_workers=16" in said(out)


@pytest.mark.parametrize("where", ["matrix", "cells"])
def test_a_bench_cell_over_the_limit_is_refused_by_steward_bench(tmp_path, policy, where):
    bench = {"matrix": {"distributed.num_workers": [1, 16], "train.optimizer.lr": [0.01, 0.02]}}
    if where == "cells":
        bench["cells"] = [{"distributed.num_workers": 1, "train.optimizer.lr": 0.01}]
        bench["cells"].append({"distributed.num_workers": 16, "train.optimizer.lr": 0.02})
    out = CliRunner().invoke(app, ["bench", str(spec_file(tmp_path, bench=bench)), "--policy", str(policy)])
    refused_before_anything_ran(tmp_path, out, f"bench.{where}.distributed.num_workers")


def test_serve_refuses_before_it_exports_a_config(tmp_path, policy):
    spec = spec_file(tmp_path, serve={}, tune=TUNE)
    export = tmp_path / "serve.yaml"
    out = CliRunner().invoke(app, ["serve", str(spec), "--export", str(export), "--policy", str(policy)])
    refused_before_anything_ran(tmp_path, out, SEARCHED)
    assert not export.exists()


def search(**space):
    return {"metric": "val_accuracy", "mode": "max", "search_space": space}


@pytest.mark.parametrize(
    ("space", "refused"),
    [
        ({"distributed.num_workers": {"grid": [2, 4, 16]}}, True),
        ({"distributed.num_workers": {"randint": [1, 17]}}, True),  # [low, high): 16 is drawn
        ({"distributed.num_workers": {"randint": [1, 9]}}, False),  # at most 8
        ({"distributed.num_workers": {"qrandint": [2, 12, 2]}}, True),
        ({"distributed.num_workers": {"choice": [1, 8]}, "train.optimizer.lr": {"uniform": [0.001, 0.1]}}, False),
    ],
)
def test_every_bound_and_grid_point_is_checked(space, refused):
    job = load_job(JOBS / "digits-lstm.yaml", [f"tune={yaml.safe_dump(search(**space), default_flow_style=True)}"])
    found = check_job(job, Policy(name="p", rules={"max_workers": 8}))  # type: ignore[arg-type]
    assert bool(found) == refused and all(v.field == SEARCHED for v in found)


def test_two_searched_values_that_break_a_rule_only_together_are_caught():
    space = {"distributed.num_workers": {"choice": [1, 2]}, "distributed.gpus_per_worker": {"choice": [1.0, 2.0]}}
    overrides = [
        "distributed.use_gpu=true",
        "distributed.num_workers=1",
        f"tune={yaml.safe_dump(search(**space), default_flow_style=True)}",
    ]
    job = load_job(JOBS / "digits-lstm.yaml", overrides)
    [found] = check_job(job, Policy(name="p", rules={"max_gpus": 2}))  # type: ignore[arg-type]
    assert found.rule == "max_gpus" and "4 GPUs" in found.message and "num_workers=2" in found.message


def test_the_library_calls_behind_the_commands_admit_the_spec_too(tmp_path, policy, monkeypatch):
    monkeypatch.setenv("STEWARD_POLICY", str(policy))
    job = load_job(spec_file(tmp_path, tune=TUNE))
    with pytest.raises(PolicyViolation, match=SEARCHED):
        pipeline.train(job)
    with pytest.raises(PolicyViolation, match=SEARCHED):
        pipeline.tune(job)
    with pytest.raises(PolicyViolation, match=SEARCHED):  # before the cluster is contacted: none listens here
        jobs.submit(job, "tune", "http://127.0.0.1:9")
    assert not any(p.is_dir() for p in (tmp_path / "runs").glob("*"))
    assert [e["action"] for e in audit.history(tmp_path / "runs" / "audit.jsonl")] == ["train", "tune", "submit"]
