"""Ray tier: every route of two real Serve deployments fuzzed over HTTP.

hypothesis writes hostile requests (deep nesting, numbers past every range, NaN tokens, lone surrogates, wrong types,
raw bytes, odd content types, auth headers, model names, methods and paths); schemathesis generates requests from the
app's own OpenAPI. No answer is a 5xx, every refusal is a JSON 4xx naming the field in one log line (never a
traceback), and /monitor and /healthz answer afterwards. Seeds are fixed (`derandomize`): CI sends the same requests.
"""

import http.client
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from steward.serve.deploy import deploy
from steward.spec.explain import ExplainSpec
from steward.spec.monitor import MonitorSpec
from steward.spec.serve import ServeSpec
from tests.fuzzing import (
    AUTH,
    FUZZ,
    HEADER_TEXT,
    JSON,
    KEY,
    LATIN1_TEXT,
    LONG_TEXT,
    SENT,
    TEXT,
    App,
    Call,
    body,
    dump,
    explain_body,
    fuzz,
    headers,
    oip_body,
    posts,
    predict_body,
    segment,
    send,
    strict_json,
    weighted,
    with_extra,
)
from tests.serving import trained_run, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _delete_serve_apps_after():
    """This module's tests share its deployments: conftest's fixture of this name would delete them after each."""
    yield


@pytest.fixture(scope="module")
def apps(tmp_path_factory, serve_port):
    """The digits CNN and a small text transformer, each served with API keys, tight explain caps and a monitor
    (bias and drift) that pushes and saves often. Deleted, with their monitors, when the module ends."""
    from ray import serve

    from steward.monitor.actor import stop_monitors

    root = tmp_path_factory.mktemp("fuzz")
    keys = root / "keys.txt"
    keys.write_text(KEY + "\n")
    jobs = {
        "cnn": ("quickstart.yaml", "model.params.channels=[8,16]"),
        "text": ("text-transformer.yaml", "data.options.num_samples=600"),
    }
    deployed = {}
    try:
        for family, (job, extra) in jobs.items():
            spec, run_dir = trained_run(root / family, job, extra, epochs=1)
            name = f"fuzz-{family}"
            cfg = ServeSpec(
                name=name,
                route_prefix=f"/{name}",
                num_cpus=0.5,
                max_instances=4,
                max_body_bytes=65_536,
                batching={"max_batch_size": 4, "batch_wait_timeout_ms": 2},
                auth={"api_keys_file": str(keys)},
            )
            monitor = MonitorSpec.model_validate(
                {
                    "bias": {"group": "group", "favourable": "1", "privileged": "a", "max_groups": 4},
                    "drift": {"min_records": 20},
                    "window": {"size": 40},
                    "push_interval_s": 0.2,
                    "persist_interval_s": 0.5,
                    "pending_persist_interval_s": 1,
                }
            )
            explain = ExplainSpec(n_steps=4, max_steps=8, max_instances=2)
            job_spec = spec.model_copy(update={"serve": cfg, "monitor": monitor, "explain": explain})
            url = deploy(job_spec, run_dir, port=serve_port).url
            labels = requests.get(f"{url}/info", headers=AUTH, timeout=60).json()["labels"]
            deployed[family] = App(family, name, url, run_dir, labels)
        yield deployed
    finally:
        for app in deployed.values():
            serve.delete(app.name)
            stop_monitors(app.name)


# -- the fuzzers -------------------------------------------------------------------------------------------------

FAMILIES = ["cnn", "text"]


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_answers_hostile_bodies_with_4xx(apps, family):
    app = apps[family]

    def keep_ids(call: Call, reply: requests.Response) -> None:
        if reply.status_code == 200:
            app.request_ids += [p["request_id"] for p in reply.json()["predictions"]]

    fuzz(app, posts(st.just("/predict"), predict_body(family)), f"{family} POST /predict", 300, keep_ids)
    assert SENT[f"{family} POST /predict"][200] >= 5, SENT  # the fuzz reaches the model, not only the parser


@pytest.mark.parametrize("family", FAMILIES)
def test_oip_infer_answers_hostile_bodies_with_4xx(apps, family):
    app = apps[family]
    path = weighted((st.just(app.name), 5), (segment([app.name]), 1)).map(lambda n: f"/v2/models/{n}/infer")
    fuzz(app, posts(path, oip_body(app)), f"{family} POST /v2/models/{{name}}/infer", 300)
    assert SENT[f"{family} POST /v2/models/{{name}}/infer"][200] >= 5, SENT


@pytest.mark.parametrize("family", FAMILIES)
def test_explain_answers_hostile_bodies_with_4xx(apps, family):
    app = apps[family]
    fuzz(app, posts(st.just("/explain"), explain_body(app)), f"{family} POST /explain", 200)
    assert SENT[f"{family} POST /explain"][200] >= 5, SENT


def test_feedback_answers_hostile_bodies_with_4xx(apps):
    app = apps["cnn"]
    issued = app.request_ids or [uuid.uuid4().hex]  # from the /predict fuzz when it ran first
    ids = st.sampled_from(issued) | TEXT | LONG_TEXT | JSON
    values = st.builds(dict, request_id=ids, label=st.sampled_from(app.labels) | TEXT | JSON).flatmap(with_extra)
    fuzz(app, posts(st.just("/feedback"), values), "cnn POST /feedback", 200)


GETS = ["/healthz", "/v2/health/live", "/v2/health/ready", "/info", "/v2", "/monitor", "/openapi.json"]


@pytest.mark.parametrize("family", FAMILIES)
def test_get_routes_answer_hostile_headers_names_and_queries(apps, family):
    app = apps[family]
    named = segment([app.name]).flatmap(lambda n: st.sampled_from([f"/v2/models/{n}", f"/v2/models/{n}/ready"]))
    query = st.dictionaries(HEADER_TEXT, LATIN1_TEXT, max_size=3).map(lambda q: "?" + urlencode(q) if q else "")
    calls = st.builds(
        lambda path, q, h, b: Call("GET", path + q, h, b),
        st.sampled_from(GETS) | named,
        query,
        headers(),
        st.none() | body(JSON),
    )
    fuzz(app, calls, f"{family} GET", 200)


def test_unknown_paths_and_methods_get_json_4xx(apps):
    app = apps["cnn"]
    known = ["predict", "explain", "feedback", "monitor", "info", "healthz", "v2", "models", app.name, "infer", "ready"]
    paths = st.lists(segment(known), min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts))
    methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    calls = st.builds(
        Call,
        methods,
        paths | st.sampled_from(GETS + ["/predict", "/explain", "/feedback"]),
        headers(),
        st.none() | body(JSON),
    )
    fuzz(app, calls, "cnn any method, any path", 250)


# -- lies about the body, and the log of a refusal ---------------------------------------------------------------


def raw_request(app: App, path: str, headers: list[tuple[str, str]], body: bytes) -> tuple[int, bytes] | None:
    """POST with headers exactly as given (http.client, which lets a Content-Length lie); None when no answer
    comes within a few seconds (the server waits for bytes that never come) and the client gives up."""
    parts = urlsplit(app.url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=3)
    try:
        conn.putrequest("POST", parts.path + path, skip_accept_encoding=True)
        for key, value in headers:
            conn.putheader(key, value)
        conn.endheaders()
        conn.send(body)
        reply = conn.getresponse()
        return reply.status, reply.read()
    except TimeoutError:
        return None
    finally:
        conn.close()


def test_content_length_lies_get_4xx_or_no_answer(apps):
    app = apps["cnn"]
    good = json.dumps({"instances": [[[0.0] * 8] * 8]}).encode()
    auth = list(AUTH.items()) + [("Content-Type", "application/json")]
    refused = raw_request(app, "/predict", [*auth, ("Content-Length", str(10**9))], b"{}")
    assert refused is not None and refused[0] == 413 and strict_json(refused[1])["field"] == "body", refused
    lies = [
        "5",  # the app reads 5 bytes; the HTTP server may refuse the rest, read as the next request, first
        *("abc", "-1", "1e3", " 12", "5, 5"),  # refused by the HTTP server, before the app
        *(str(len(good) + 100), str(2 * len(good))),  # the server waits for bytes that never come
    ]
    for declared in lies:
        answer = raw_request(app, "/predict", [*auth, ("Content-Length", declared)], good)
        assert answer is None or 400 <= answer[0] < 500, (declared, answer)
        if answer is not None and answer[1].startswith(b"{"):  # the app's answer, not the HTTP server's
            assert strict_json(answer[1])["field"] == "body", (declared, answer)
    assert requests.post(f"{app.url}/predict", data=good, headers=AUTH, timeout=60).status_code == 200


def replica_logs(app: App) -> list[Path]:
    from ray.serve._private.logging_utils import get_serve_logs_dir

    return sorted(Path(get_serve_logs_dir()).glob(f"replica_{app.name}_*.log"))


def replica_log_text(app: App) -> str:
    return "".join(path.read_text(errors="replace") for path in replica_logs(app))


def js(value: Any) -> bytes:
    return dump(value, ascii_only=True).encode()


def oip(n: int, image: list, datatype: str = "FP32") -> dict:
    """An OIP input tensor of `n` copies of `image` (n strings for BYTES)."""
    if datatype == "BYTES":
        return {"name": "input", "shape": [n], "datatype": "BYTES", "data": ["a digit"] * n}
    return {"name": "input", "shape": [n, 8, 8], "datatype": datatype, "data": [image] * n}


IMAGE = [[0.0] * 8] * 8
INFER = "/v2/models/fuzz-cnn/infer"
# (what, method, path, body, status, the part named): the hostile bodies of issue 22, then what the fuzzers found.
HOSTILE = [
    ("30,000-deep JSON", "POST", "/predict", b"[" * 30_000 + b"]" * 30_000, 400, "body"),
    ("an integer of 5,000 digits", "POST", "/predict", b'{"instances": [' + b"1" * 5000 + b"]}", 400, "body"),
    ("a pixel past 64 bits", "POST", "/predict", js({"instances": [[[10**300] * 8] * 8]}), 422, "instances[0]"),
    ("explain on extreme input", "POST", "/explain", js({"instances": [[[3e38] * 8] * 8]}), 422, "instances[0]"),
    ("a string as a pixel", "POST", "/predict", js({"instances": [[["0.5"] * 8] * 8]}), 422, "instances[0]"),
    ("a boolean as a pixel", "POST", "/predict", js({"instances": [[[True] * 8] * 8]}), 422, "instances[0]"),
    ("an empty OIP tensor", "POST", INFER, js({"inputs": [oip(0, [])]}), 422, "inputs[0].shape"),
    ("a lone surrogate as a key", "POST", "/predict", js({"instances": [IMAGE], "\ud800": 1}), 422, "body"),
    ("a lone surrogate datatype", "POST", INFER, js({"inputs": [oip(1, IMAGE, "\ud800")]}), 422, "inputs[0].datatype"),
    ("a lone surrogate as the OIP id", "POST", INFER, js({"id": "\udc00", "inputs": [oip(1, IMAGE)]}), 422, "id"),
    ("no such route", "GET", "/nothing/here", None, 404, "path"),
    ("a method the route does not take", "PUT", "/predict", js({"instances": [IMAGE]}), 405, "method"),
]


def test_each_hostile_body_gets_a_4xx_naming_the_part_and_one_log_line(apps):
    app = apps["cnn"]
    for what, method, path, data, status, part in HOSTILE:
        request_id = uuid.uuid4().hex
        reply = send(app, Call(method, path, {**AUTH, "X-Request-ID": request_id}, data), "hostile bodies")
        assert (reply.status_code, reply.json()["field"]) == (status, part), (what, reply.text)
        lines = wait_for(lambda rid=request_id: [s for s in replica_log_text(app).splitlines() if rid in s], 30, what)
        assert len(lines) == 1 and f" {status} " in lines[0], (what, lines)
    assert "Traceback" not in replica_log_text(app)
    text = apps["text"]
    empty = Call("POST", "/v2/models/fuzz-text/infer", AUTH, js({"inputs": [oip(0, [], "BYTES")]}))
    reply = send(text, empty, "hostile bodies")
    assert (reply.status_code, reply.json()["field"]) == (422, "inputs[0].shape"), reply.text
    # /feedback answers with the request id it was sent
    send(app, Call("POST", "/feedback", AUTH, js({"request_id": "\ud800", "label": "1"})), "hostile bodies")


# -- schemathesis over the served OpenAPI ------------------------------------------------------------------------


def with_request_bodies(schema: dict) -> dict:
    """The served OpenAPI with the JSON bodies its POST routes take: they read the body themselves (to refuse by
    field and by size), so FastAPI does not describe it; the same pydantic models do."""
    from steward.serve.explain import ExplainRequest
    from steward.serve.protocol import FeedbackRequest, InferRequest, PredictRequest

    bodies = {
        "/predict": PredictRequest,
        "/v2/models/{name}/infer": InferRequest,
        "/explain": ExplainRequest,
        "/feedback": FeedbackRequest,
    }
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in bodies.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        content = {"application/json": {"schema": body}}
        schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": content}
    return schema


def call_cases(app: App, strategy: st.SearchStrategy) -> int:
    """Send schemathesis's cases from `strategy` (with the API key), checking each answer; returns how many."""
    from schemathesis.checks import not_a_server_error

    sent = 0

    @settings(FUZZ, max_examples=80)
    @given(strategy)
    def run(case) -> None:
        nonlocal sent
        response = case.call(base_url=app.url, headers=AUTH, timeout=60)
        sent += 1
        case.validate_response(response, checks=[not_a_server_error])
        if 400 <= response.status_code < 500:
            refusal = strict_json(response.content.decode())
            assert {"error", "field"} <= refusal.keys(), (case.method, case.formatted_path, refusal)

    run()
    return sent


def test_schemathesis_over_the_served_openapi_finds_no_server_error(apps, capsys):
    import schemathesis
    from schemathesis import GenerationMode

    app = apps["cnn"]
    served = requests.get(f"{app.url}/openapi.json", headers=AUTH, timeout=60)
    assert served.status_code == 200, served.text
    schema = schemathesis.openapi.from_dict(with_request_bodies(served.json()))
    cases: Counter[str] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        runs = [(GenerationMode.POSITIVE, None)]
        if "{name}" in operation.path:  # the real name too, so the body is looked at, not only the path
            runs.append((GenerationMode.POSITIVE, {"name": app.name}))
        if len(operation.body):
            runs.append((GenerationMode.NEGATIVE, None))
        for mode, path_parameters in runs:
            label = f"{operation.label} ({mode.value}{', its name' if path_parameters else ''})"
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)
            cases[label] = call_cases(app, strategy)
    with capsys.disabled():
        print(f"\nschemathesis: {sum(cases.values())} cases over {len(cases)} operation runs")
        for label, count in sorted(cases.items()):
            print(f"  {count:4d}  {label}")
    routes = {f"{method.upper()} {path}" for path, methods in served.json()["paths"].items() for method in methods}
    assert {label.split(" (")[0] for label in cases} == routes


# -- afterwards --------------------------------------------------------------------------------------------------


def test_after_the_fuzz_monitor_and_healthz_answer_and_no_replica_logged_a_traceback(apps, capsys):
    for app in apps.values():
        assert requests.get(f"{app.url}/healthz", timeout=60).status_code == 200
        reply = requests.get(f"{app.url}/monitor", headers=AUTH, timeout=60)
        assert reply.status_code == 200, reply.text
        report = strict_json(reply.text)
        assert report["records"] > 0 and report["deployment"] == app.name
        state = app.run_dir / "monitor" / app.name / "state.json"
        wait_for(state.exists, 30, f"{state}")
        json.loads(state.read_text())  # what a restarted monitor reloads
        assert "Traceback" not in replica_log_text(app), app.name
    with capsys.disabled():
        print(f"\nhypothesis fuzz: {sum(sum(c.values()) for c in SENT.values())} requests")
        for fuzzer, statuses in SENT.items():
            print(f"  {sum(statuses.values()):5d}  {fuzzer}: {dict(sorted(statuses.items()))}")
