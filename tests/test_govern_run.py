"""Ray tier: governance on real runs. Cards equal the trained runs' metrics.json, the CLI's run events carry
the spec, data and model hashes, and Serve refuses a run whose fairness gate failed unless a reason is given."""

import json
import shutil

import pytest
import requests
from typer.testing import CliRunner

from steward.cli import app
from steward.govern import audit
from steward.govern.card import CARD_JSON, data_hash, validate_card
from steward.runs import create_run, read_spec
from steward.serve.deploy import FairnessGateFailed, deploy, stop
from steward.spec import load_job
from steward.stages import train_model
from tests.conftest import JOBS

pytestmark = pytest.mark.slow
DDP = ("distributed.num_workers=1", "distributed.strategy=ddp", "distributed.zero_stage=0")


@pytest.fixture(scope="module")
def quickstart(ray_local, tmp_path_factory):
    """jobs/quickstart.yaml trained through the CLI, in-process on the module's Ray (one DDP worker: the card reads
    what the run folder says, whatever the strategy; test_train.py covers the ZeRO stages)."""
    out = tmp_path_factory.mktemp("govern") / "runs"
    args = ["train", str(JOBS / "quickstart.yaml"), "--set", f"output_dir={out}"]
    args += [f"--set={s}" for s in (*DDP, "train.epochs=2")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [run_dir] = (out / "quickstart").iterdir()
    return run_dir


def test_the_quickstart_card_holds_the_runs_own_numbers(quickstart):
    card = json.loads((quickstart / CARD_JSON).read_text())
    metrics = json.loads((quickstart / "metrics.json").read_text())
    validate_card(card)
    assert card["quantitative_analyses"]["overall"] == metrics["overall"]
    assert card["evaluation_data"]["num_samples"] == metrics["num_samples"] == 180
    model = json.loads((quickstart / "model" / "model.json").read_text())
    training = card["training"]
    assert card["model_details"]["num_parameters"] == training["num_parameters"] == model["num_parameters"]
    assert (training["strategy"], training["zero_stage"], training["workers"], training["epochs_run"]) == (
        "ddp",
        0,
        1,
        2,
    )
    assert training["train_time_s"] > 0 and training["wall_time_s"] >= training["train_time_s"]
    assert card["training_data"]["data_sha256"] == data_hash(read_spec(quickstart))
    assert f"{metrics['overall']['accuracy']:.4f}" in (quickstart / "model_card.md").read_text()


def test_the_cli_run_events_carry_spec_data_and_model_hashes(quickstart):
    log = quickstart.parent.parent / "audit.jsonl"
    assert audit.verify(log).ok
    events = audit.history(log, run=quickstart.name)
    assert [e["event"] for e in events] == ["run.started", "run.finished"]
    card = json.loads((quickstart / CARD_JSON).read_text())
    finished = events[-1]
    assert finished["spec_hash"] == card["model_details"]["spec_hash"]
    assert finished["data_sha256"] == card["training_data"]["data_sha256"]
    assert finished["model_sha256"] == audit.file_hash(quickstart / "model" / "model.safetensors")
    assert [e["event"] for e in audit.events(log)][0] == "spec.validated"


def test_the_text_job_card_holds_its_per_group_numbers(ray_local, tmp_path):
    tiny = [
        "data.options.num_samples=600",
        "train.epochs=1",
        "model.params.hidden_size=32",
        "model.params.intermediate_size=64",
        f"output_dir={tmp_path}",
        *DDP,
    ]
    spec = load_job(JOBS / "text-transformer.yaml", tiny)
    run_dir = create_run(spec)
    metrics = train_model(spec, run_dir)
    card = json.loads((run_dir / CARD_JSON).read_text())
    validate_card(card)
    assert card["quantitative_analyses"]["overall"] == metrics["overall"]
    assert card["quantitative_analyses"]["per_group"] == metrics["groups"] and metrics["groups"]["group"]
    assert card["factors"]["group_columns"] == ["group"] and card["training_data"]["modality"] == "text"
    assert card["training"]["num_parameters"] > 0 and card["intended_use"]["risk"] == "medium"


def test_serving_refuses_a_failed_fairness_gate_unless_a_reason_is_given(quickstart, serve_port, tmp_path):
    run_dir = quickstart.parent / "gate-failed"
    shutil.copytree(quickstart, run_dir, ignore=shutil.ignore_patterns("train"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "fairness_gate": "failed"}))
    spec = load_job(JOBS / "quickstart.yaml", [f"output_dir={quickstart.parent.parent}"])
    log = quickstart.parent.parent / "audit.jsonl"

    with pytest.raises(FairnessGateFailed, match="--override-fairness-gate"):
        deploy(spec, run_dir, port=serve_port)
    assert [e["event"] for e in audit.history(log, run="gate-failed")] == ["deployment.refused"]

    reason = "reviewed by the RAI board (ticket RAI-42): gap within tolerance for this internal pilot"
    deployed = deploy(spec, run_dir, port=serve_port, override_fairness_gate=reason)
    info = requests.get(f"{deployed.url}/info", timeout=30).json()
    assert info["model_card"]["quantitative_analyses"]["overall"] == metrics["overall"]
    stop(deployed.name, None, output_dir=quickstart.parent.parent)

    events = audit.history(log, run="gate-failed")
    assert [e["event"] for e in events] == ["deployment.refused", "fairness_gate.overridden", "deployment.created"]
    assert events[1]["reason"] == reason and events[1]["who"]
    assert audit.history(log, deployment="quickstart")[-1]["event"] == "deployment.stopped"
    assert audit.verify(log).ok
