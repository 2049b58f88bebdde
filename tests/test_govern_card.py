"""Model cards from a run folder: every section filled from the files, optional stages tolerated, schema checked."""

import json

import pytest
from typer.testing import CliRunner

from steward.cli import app
from steward.govern.card import CARD_JSON, CARD_MD, build_card, data_hash, validate_card, write_card
from steward.runs import create_run, spec_hash
from steward.spec import load_job
from tests.conftest import JOBS

METRICS = {
    "split": "test",
    "num_samples": 180,
    "overall": {"accuracy": 0.9611, "f1_macro": 0.9598, "loss": 0.1234},
    "groups": {"group": {"a": {"count": 90, "accuracy": 0.97, "loss": 0.1}, "b": {"count": 90, "accuracy": 0.95}}},
}


def fake_run(tmp_path, metrics=METRICS, job="quickstart.yaml"):
    """A run folder as training leaves it, without training: spec, status, model metadata, history, metrics."""
    spec = load_job(JOBS / job, [f"output_dir={tmp_path}"])
    run_dir = create_run(spec)
    (run_dir / "model").mkdir()
    (run_dir / "model" / "model.json").write_text(
        json.dumps({"num_parameters": 12345, "data": {"modality": "image", "label_names": [str(i) for i in range(10)]}})
    )
    (run_dir / "model" / "model.safetensors").write_bytes(b"weights")
    epochs = [
        {"kind": "epoch", "epoch": e, "epoch_seconds": 1.5, "samples_per_s": 900.0, "train_loss": 0.2} for e in (1, 2)
    ]
    (run_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs))
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return spec, run_dir


def test_a_card_is_filled_from_the_run_folder_and_meets_the_schema(tmp_path):
    spec, run_dir = fake_run(tmp_path)
    card = write_card(run_dir)
    assert json.loads((run_dir / CARD_JSON).read_text()) == card
    validate_card(card)
    assert card["quantitative_analyses"]["overall"] == METRICS["overall"]
    assert card["quantitative_analyses"]["per_group"] == METRICS["groups"]
    details, training = card["model_details"], card["training"]
    assert details["spec_hash"] == spec_hash(spec) and details["num_parameters"] == 12345
    assert details["owners"] == ["ml-platform-team"] and card["intended_use"]["risk"] == "low"
    shown = (training["zero_stage"], training["workers"], training["epochs_run"], training["train_time_s"])
    assert shown == (2, 2, 2, 3.0)
    assert card["training_data"]["data_sha256"] == data_hash(spec) and len(data_hash(spec)) == 64
    assert card["metrics"]["fairness_gate"] == "not_evaluated" and card["tuning"] is None
    assert card["completeness"] == {"complete": True, "missing": []}
    markdown = (run_dir / CARD_MD).read_text()
    for section in (
        "Model details",
        "Intended use",
        "Factors",
        "Metrics",
        "Evaluation data",
        "Training data",
        "Quantitative analyses",
        "Ethical considerations",
        "Caveats and recommendations",
    ):
        assert f"## {section}" in markdown
    assert "0.9611" in markdown and "group=a | 90 | 0.9700" in markdown


def test_the_data_hash_follows_the_data_not_the_spec_text(tmp_path):
    spec = load_job(JOBS / "quickstart.yaml")
    assert data_hash(spec) == data_hash(load_job(JOBS / "quickstart.yaml", ["train.epochs=3"]))
    assert data_hash(spec) != data_hash(load_job(JOBS / "quickstart.yaml", ["seed=1"]))  # other rows in each split


def test_optional_stages_intervals_gate_privacy_and_explanations_are_carried(tmp_path):
    metrics = {
        **METRICS,
        "overall": {"accuracy": {"value": 0.96, "low": 0.93, "high": 0.98}, "loss": 0.12},
        "fairness_gate": "failed",
        "mitigation": {"method": "reweighing", "before": {"dpd": 0.3}, "after": {"dpd": 0.08}},
    }
    _, run_dir = fake_run(tmp_path, metrics)
    (run_dir / "privacy.json").write_text(json.dumps({"masked": {"text": {"EMAIL": 12}}}))
    (run_dir / "explanations.json").write_text(json.dumps({"method": "integrated_gradients", "delta": 0.01}))
    card = write_card(run_dir)
    assert card["fairness"]["gate"] == "failed" and card["fairness"]["mitigation"]["method"] == "reweighing"
    assert card["training_data"]["privacy"] == {"masked": {"text": {"EMAIL": 12}}}
    assert card["explanations"]["method"] == "integrated_gradients"
    assert "0.9600 [0.9300, 0.9800]" in (run_dir / CARD_MD).read_text()


def test_a_spec_without_governance_gets_an_incomplete_card(tmp_path):
    spec = load_job(JOBS / "quickstart.yaml", [f"output_dir={tmp_path}"])
    spec = spec.model_copy(update={"governance": None})
    run_dir = create_run(spec)
    (run_dir / "metrics.json").write_text(json.dumps(METRICS))
    card = build_card(run_dir, data_sha256="0" * 64)
    assert card["completeness"] == {"complete": False, "missing": ["governance"]}
    assert card["intended_use"]["risk"] == "unspecified"


def test_the_schema_refuses_a_card_missing_a_section(tmp_path):
    _, run_dir = fake_run(tmp_path)
    card = build_card(run_dir)
    del card["ethical_considerations"]
    with pytest.raises(ValueError, match="ethical_considerations"):
        validate_card(card)
    card = build_card(run_dir)
    card["quantitative_analyses"]["overall"]["accuracy"] = "high"
    with pytest.raises(ValueError, match="quantitative_analyses/overall/accuracy"):
        validate_card(card)


def test_steward_card_prints_it(tmp_path):
    _, run_dir = fake_run(tmp_path)
    runner = CliRunner()
    missing = runner.invoke(app, ["card", str(run_dir)])
    assert missing.exit_code == 2 and CARD_JSON in missing.output
    write_card(run_dir)
    out = runner.invoke(app, ["card", str(run_dir)])
    assert out.exit_code == 0 and "# Model card: quickstart" in out.output and "0.9611" in out.output
    as_json = runner.invoke(app, ["card", str(run_dir), "--json"])
    assert json.loads(as_json.output)["quantitative_analyses"]["overall"] == METRICS["overall"]


def test_a_sweeps_card_summarises_the_trials(tmp_path):
    _, run_dir = fake_run(tmp_path, job="tune-digits-asha.yaml")
    (run_dir / "results.csv").write_text(
        "trial_id,status,iterations,val_accuracy,train.optimizer.lr,error\n"
        "t1,completed,12,0.97,0.002,\nt2,pruned,2,0.61,0.0001,\nt3,pruned,2,0.55,0.00012,\n"
    )
    (run_dir / "best.yaml").write_text("# Best trial t1 of the sweep in x (val_accuracy = 0.9700).\nname: x\n")
    tuning = write_card(run_dir)["tuning"]
    assert (tuning["trials"], tuning["trial_status"], tuning["scheduler"]) == (3, {"completed": 1, "pruned": 2}, "asha")
    assert tuning["best"].startswith("Best trial t1") and "train.optimizer.lr" in tuning["search_space"]


def test_a_finished_run_with_a_failed_gate_is_audited_with_its_hashes(tmp_path):
    from steward.govern import audit
    from steward.govern.events import record_run

    _, run_dir = fake_run(tmp_path, {**METRICS, "fairness_gate": "failed"})
    card = write_card(run_dir)
    record_run("run.finished", run_dir, tmp_path, kind="train")
    finished, gate = audit.history(tmp_path / "audit.jsonl", run=run_dir.name)
    assert (finished["event"], gate["event"]) == ("run.finished", "fairness_gate.failed")
    assert (
        finished["model_sha256"]
        == card["model_details"]["model_sha256"]
        == audit.file_hash(run_dir / "model" / "model.safetensors")
    )
    assert finished["data_sha256"] == card["training_data"]["data_sha256"] and finished["fairness_gate"] == "failed"


def test_serve_refuses_a_failed_gate_before_ray_starts_and_audits_the_override(tmp_path, monkeypatch):
    import ray
    import yaml

    from steward.govern import audit

    monkeypatch.setenv("COLUMNS", "200")
    spec, run_dir = fake_run(tmp_path, {**METRICS, "fairness_gate": "failed"})
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    runner = CliRunner()
    refused = runner.invoke(app, ["serve", str(spec_file), "--run", str(run_dir)])
    assert refused.exit_code == 2 and "fairness gate" in refused.output and "--override-fairness-gate" in refused.output
    assert not ray.is_initialized()
    reason = "accepted by the RAI board, ticket RAI-7"
    exported = tmp_path / "serve.yaml"
    args = ["serve", str(spec_file), "--run", str(run_dir), "--export", str(exported), "--override-fairness-gate"]
    out = runner.invoke(app, [*args, reason])
    assert out.exit_code == 0, out.output
    assert exported.exists() and not ray.is_initialized()
    events = audit.history(tmp_path / "audit.jsonl", run=run_dir.name)
    assert [e["event"] for e in events] == ["deployment.refused", "fairness_gate.overridden"]
    assert events[1]["reason"] == reason and events[1]["action"] == "export" and events[1]["deployment"] == "quickstart"
