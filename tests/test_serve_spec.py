"""Fast tier for serving: the serve section, API keys, request parsing and OIP tensors; no Ray."""

import asyncio

import numpy as np
import pytest
import yaml

from steward.serve.auth import AuthConfigError, key_is_valid, load_keys, presented_key
from steward.serve.model import Output, non_finite_row
from steward.serve.protocol import (
    MAX_ATTRIBUTE_CHARS,
    BadRequest,
    InferRequest,
    PredictRequest,
    check_attributes,
    oip_instances,
    parse_body,
    read_body,
    validated,
)
from steward.spec import SpecError, load_job
from steward.spec.serve import AuthSpec, ServeSpec
from tests.conftest import JOBS
from tests.test_cli import steward


def problems(tmp_path, serve, job="quickstart.yaml"):
    raw = yaml.safe_load((JOBS / job).read_text())
    raw["serve"] = serve
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as err:
        load_job(path)
    return {p.path: p.message for p in err.value.problems}


def test_example_jobs_serve_what_the_issue_asks():
    digits, text = load_job(JOBS / "quickstart.yaml"), load_job(JOBS / "text-transformer.yaml")
    assert digits.serve and digits.serve.route_prefix == "/digits" and digits.serve.autoscaling
    assert text.serve and text.serve.quantize == "int8" and text.serve.auth and text.serve.auth.api_keys_env


@pytest.mark.parametrize(
    ("serve", "path", "fragment"),
    [
        ({"num_replicas": 2, "autoscaling": {"max_replicas": 3}}, "serve.num_replicas", "not both"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "serve.autoscaling.min_replicas", "<= max_replicas"),
        ({"auth": {}}, "serve.auth.api_keys_env", "exactly one"),
        ({"auth": {"api_keys_env": "K", "api_keys_file": "k.txt"}}, "serve.auth.api_keys_env", "exactly one"),
        ({"auth": {"api_keys": ["secret"]}}, "serve.auth.api_keys", "unknown key"),
        ({"quantize": "int4"}, "serve.quantize", "'none' or 'int8'"),
        ({"quantize_tolerance": 2}, "serve.quantize_tolerance", "less than or equal to 1"),
        ({"route_prefix": "digits"}, "serve.route_prefix", "pattern"),
        ({"batching": {"max_batch_sise": 8}}, "serve.batching.max_batch_sise", "did you mean `max_batch_size`"),
        ({"max_ongoing_requests": 0}, "serve.max_ongoing_requests", "greater than or equal to 1"),
    ],
)
def test_bad_serve_sections_name_the_field(tmp_path, serve, path, fragment):
    found = problems(tmp_path, serve)
    assert path in found and fragment in found[path], found


def test_scale_to_zero_and_batching_off_are_allowed():
    cfg = ServeSpec.model_validate({"autoscaling": {"min_replicas": 0, "max_replicas": 1}, "batching": None})
    assert cfg.autoscaling and cfg.autoscaling.min_replicas == 0 and cfg.batching is None and cfg.prefix == ""


def test_generation_bounds_belong_to_language_models(tmp_path):
    gpt = load_job(JOBS / "tiny-gpt.yaml")
    assert gpt.serve and gpt.serve.generation and gpt.serve.generation.max_new_tokens < gpt.data.max_length
    found = problems(tmp_path, {"generation": {"max_new_tokens": 8}})
    assert "causal_lm" in found["serve.generation"]
    assert "serve.generation.max_new_tokens" in problems(
        tmp_path, {"generation": {"max_new_tokens": 0}}, "tiny-gpt.yaml"
    )


def test_keys_from_env_and_file_never_from_the_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("STEWARD_TEST_KEYS", " alpha , beta,,")
    assert load_keys(AuthSpec(api_keys_env="STEWARD_TEST_KEYS")) == [b"alpha", b"beta"]
    keys = tmp_path / "keys"
    keys.write_text("# comment\ngamma  # trailing comment\n\n")
    assert load_keys(AuthSpec(api_keys_file=str(keys))) == [b"gamma"]
    monkeypatch.setenv("STEWARD_TEST_KEYS", "")
    with pytest.raises(AuthConfigError, match=r"api_keys_env: \$STEWARD_TEST_KEYS holds no API key"):
        load_keys(AuthSpec(api_keys_env="STEWARD_TEST_KEYS"))
    with pytest.raises(AuthConfigError, match="cannot be read"):
        load_keys(AuthSpec(api_keys_file=str(tmp_path / "missing")))
    assert load_keys(None) == []


def test_key_checks():
    keys = [b"alpha", b"beta"]
    assert key_is_valid("beta", keys) and not key_is_valid("alph", keys) and not key_is_valid(None, keys)
    assert not key_is_valid("", keys) and key_is_valid(None, [])
    assert presented_key({"authorization": "Bearer  tok "}) == "tok"
    assert presented_key({"authorization": "Basic tok", "x-api-key": "k"}) == "k"


@pytest.mark.parametrize(
    ("raw", "status", "fragment"),
    [
        (b"x" * 2000, 413, "2000 bytes is over the 1024-byte limit"),
        (b'{"a": "\xc3\x28"}', 400, "not valid UTF-8 (byte 7)"),
        (b'{"a": ', 400, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
        (b'{"instances": [' + b"9" * 5000 + b"]}", 400, "not valid JSON here"),
    ],
)
def test_parse_body_refusals(raw, status, fragment):
    with pytest.raises(BadRequest) as err:
        parse_body(raw, 1024 if status == 413 else 1_000_000)
    assert err.value.status == status and fragment in err.value.message and err.value.field == "body"


def test_a_client_gone_before_its_whole_body_is_a_400_not_a_traceback():
    from starlette.requests import Request

    messages = [{"type": "http.request", "body": b'{"instances": ', "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [(b"content-length", b"100")]}
    with pytest.raises(BadRequest) as err:
        asyncio.run(read_body(Request(scope, receive), 1_000_000))
    assert (err.value.status, err.value.field) == (400, "body") and "closed before the whole body" in err.value.message


def test_validation_errors_name_nested_fields():
    with pytest.raises(BadRequest) as err:
        validated(InferRequest, {"inputs": [{"name": "x", "shape": "1", "datatype": "FP32", "data": []}]})
    assert err.value.field == "inputs[0].shape" and err.value.status == 422
    assert validated(PredictRequest, {"instances": [1]}).attributes == {}


@pytest.mark.parametrize(
    ("attributes", "field", "fragment"),
    [
        ({"group": ["a", "\ud800"]}, "attributes.group[1]", "not valid UTF-8"),
        ({"group": ["x" * (MAX_ATTRIBUTE_CHARS + 1)]}, "attributes.group[0]", "over the limit of"),
        ({"group": [float("nan")]}, "attributes.group[0]", "not a finite number"),
        ({"group": [10**30]}, "attributes.group[0]", "beyond 64 bits"),
        ({"gr\udc00oup": ["a"]}, "attributes", "attribute name not valid UTF-8"),
    ],
)
def test_attributes_that_cannot_be_kept_as_group_keys_are_refused_by_element(attributes, field, fragment):
    with pytest.raises(BadRequest) as err:
        check_attributes(attributes)
    assert err.value.status == 422 and err.value.field == field and fragment in err.value.message


def test_attributes_that_make_plain_group_keys_pass():
    check_attributes({"group": ["a", "x" * MAX_ATTRIBUTE_CHARS, 3, 2.5, True, None, -(2**63) + 1]})


def test_the_first_instance_with_a_non_finite_output_is_found():
    probabilities = np.full((3, 2), 0.5, dtype=np.float32)
    assert non_finite_row(Output(probabilities)) is None
    probabilities[2, 0] = np.nan
    assert non_finite_row(Output(probabilities)) == 2
    embeddings = np.zeros((3, 4), dtype=np.float32)
    embeddings[1, 3] = np.inf
    assert non_finite_row(Output(probabilities, embeddings)) == 1


def test_oip_tensors_to_instances():
    flat = InferRequest.model_validate(
        {"inputs": [{"name": "x", "shape": [2, 2, 3], "datatype": "FP32", "data": list(range(12))}]}
    )
    np.testing.assert_array_equal(oip_instances(flat, "image", (2, 3)), np.arange(12).reshape(2, 2, 3))
    text = InferRequest.model_validate(
        {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}
    )
    assert oip_instances(text, "text", (32,)) == ["a", "b"]
    with pytest.raises(BadRequest, match="inputs\\[0\\].shape"):
        oip_instances(flat, "image", (3, 2))


@pytest.mark.parametrize("command", [["serve"], ["serve", "deploy"], ["serve", "status"], ["serve", "stop"]])
def test_serve_help(command):
    out = steward(*command, "--help")
    assert out.returncode == 0 and "Usage" in out.stdout


def test_serve_without_a_run_or_section_exits_2(tmp_path):
    out = steward("serve", str(JOBS / "quickstart.yaml"), "--set", f"output_dir={tmp_path}")
    assert out.returncode == 2 and "no succeeded run of 'quickstart'" in out.stderr and "Traceback" not in out.stderr
    out = steward("serve", str(JOBS / "digits-lstm.yaml"))
    assert out.returncode == 2 and "serve: the spec has no serve section" in out.stderr


def test_a_relative_keys_file_resolves_against_the_spec_folder(tmp_path):
    raw = yaml.safe_load((JOBS / "quickstart.yaml").read_text())
    raw["serve"] = {"auth": {"api_keys_file": "secrets/keys.txt"}}
    (tmp_path / "specs").mkdir()
    path = tmp_path / "specs" / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    auth = load_job(path).serve.auth
    assert auth.api_keys_file == str(tmp_path / "specs" / "secrets" / "keys.txt")
