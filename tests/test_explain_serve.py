"""Ray tier: POST /explain on a real Serve deployment of a real trained run, over HTTP.

It answers like `steward explain`, with the same auth and input checks as /predict, and refuses requests over
the spec's caps (explain.max_instances, explain.max_steps) with a 4xx naming the cap, before doing the work.
"""

import numpy as np
import pytest

from steward.serve.deploy import deploy
from steward.spec.explain import ExplainSpec
from steward.spec.serve import ServeSpec
from tests.serving import post, trained_run, validation_inputs

pytestmark = pytest.mark.slow
KEY = "explain-key-123"


def serve_with_caps(root, port):
    """The digits CNN served with API keys and tight explain caps: (spec, url, headers)."""
    spec, run_dir = trained_run(root, "quickstart.yaml", "model.params.channels=[8,16]", epochs=1)
    keys = root / "keys.txt"
    keys.write_text(KEY + "\n")
    cfg = ServeSpec(route_prefix="/explained", num_cpus=0.5, batching=None, auth={"api_keys_file": str(keys)})
    caps = ExplainSpec(n_steps=16, max_steps=32, max_instances=2)
    url = deploy(spec.model_copy(update={"serve": cfg, "explain": caps}), run_dir, port=port).url
    return spec, url, {"Authorization": f"Bearer {KEY}"}


def test_explain_on_a_real_deployment(tmp_path, serve_port):
    """One deployment for both halves: the autouse fixture deletes Serve apps after every test."""
    spec, url, headers = serve_with_caps(tmp_path, serve_port)
    answers_with_attributions_that_add_up(spec, url, headers)
    refuses_over_cap_and_bad_requests_with_4xx(spec, url, headers)


def answers_with_attributions_that_add_up(spec, url, headers):
    instances = validation_inputs(spec, 2)
    reply = post(f"{url}/explain", json={"instances": instances, "n_steps": 32}, headers=headers)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["n_steps"] == 32 and body["baseline"] == "zeros" and len(body["explanations"]) == 2
    predicted = post(f"{url}/predict", json={"instances": instances}, headers=headers).json()["predictions"]
    for record, prediction in zip(body["explanations"], predicted, strict=True):
        assert np.asarray(record["attributions"]).shape == (8, 8)
        assert record["target"] == prediction["label"]  # the predicted class is what gets explained
        assert record["score"] == pytest.approx(max(prediction["probabilities"]), abs=1e-5)
        assert abs(record["delta"]) < 0.05


def refuses_over_cap_and_bad_requests_with_4xx(spec, url, headers):
    one, three = validation_inputs(spec, 1), validation_inputs(spec, 3)
    refusals = {
        "too many instances": ({"instances": three}, 413, "explain.max_instances"),
        "too many steps": ({"instances": one, "n_steps": 33}, 422, "explain.max_steps"),
        "bad shape (as /predict)": ({"instances": [[1, 2]]}, 422, "instances[0]"),
        "unknown label": ({"instances": one, "target": "cat"}, 422, "target"),
        "unknown field": ({"instances": one, "steps": 4}, 422, "steps"),
        "overflows the model": ({"instances": [[[3e38] * 8] * 8]}, 422, "instances[0]: the model's output"),
    }
    for what, (body, status, fragment) in refusals.items():
        reply = post(f"{url}/explain", json=body, headers=headers)
        assert reply.status_code == status and fragment in reply.json()["error"], (what, reply.text)
    refused = post(f"{url}/explain", json={"instances": one})
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert post(f"{url}/explain", json={"instances": one, "n_steps": 32}, headers=headers).status_code == 200
