"""Ray tier: every route of two real Serve deployments fuzzed over HTTP.

hypothesis writes hostile requests (deep nesting, numbers past every range, NaN tokens, lone surrogates, wrong types,
raw bytes, odd content types, auth headers, model names, methods and paths); schemathesis generates requests from the
app's own OpenAPI. No answer is a 5xx, every refusal is a JSON 4xx naming the field in one log line (never a
traceback), and /monitor and /healthz answer afterwards. Seeds are fixed (`derandomize`): CI sends the same requests.
"""

import http.client
import json
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from steward.serve.deploy import deploy
from steward.serve.protocol import OUTPUTS
from steward.spec.explain import ExplainSpec
from steward.spec.monitor import MonitorSpec
from steward.spec.serve import ServeSpec
from tests.serving import trained_run, wait_for

pytestmark = pytest.mark.slow
KEY = "fuzz-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
FUZZ = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=list(HealthCheck),
)
SENT: defaultdict[str, Counter] = defaultdict(Counter)  # fuzzer -> status -> requests, printed at the end


@dataclass
class App:
    family: str
    name: str
    url: str
    run_dir: Path
    labels: list[str]
    request_ids: list[str] = field(default_factory=list)  # issued by /predict during the fuzz, for /feedback


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


# -- what every answer must be -----------------------------------------------------------------------------------


@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None = None
    chunked: bool = False  # sent with Transfer-Encoding: chunked instead of a Content-Length


def no_constant(token: str) -> None:
    raise AssertionError(f"{token} in a reply: JSON has no such number")


def strict_json(text: str) -> Any:
    return json.loads(text, parse_constant=no_constant)


def send(app: App, call: Call, fuzzer: str) -> requests.Response:
    """One request; every answer is below 500, strict JSON (no NaN), and a refusal names its field."""
    body = iter([call.body]) if call.chunked and call.body is not None else call.body
    reply = requests.request(call.method, app.url + call.path, headers=call.headers, data=body, timeout=60)
    SENT[fuzzer][reply.status_code] += 1
    where = f"{call.method} {call.path} {call.headers} {(call.body or b'')[:300]!r} -> {reply.status_code}"
    assert reply.status_code < 500, f"{where}: {reply.text[:1000]}"
    if call.method == "HEAD":
        return reply
    try:
        payload = strict_json(reply.text)
    except ValueError as err:
        raise AssertionError(f"{where}: not JSON ({err}): {reply.text[:300]!r}") from None
    if reply.status_code >= 400:
        assert isinstance(payload, dict) and {"error", "field"} <= payload.keys(), f"{where}: {reply.text[:300]}"
    return reply


# -- hostile values ----------------------------------------------------------------------------------------------


class Raw(str):
    """A JSON token written as it is: numbers no float or int here holds, NaN and Infinity."""


def dump(value: Any, ascii_only: bool) -> str:
    """JSON text of `value`; `ascii_only` False keeps lone surrogates as (invalid) UTF-8 in the bytes sent."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, list):
        return "[" + ",".join(dump(v, ascii_only) for v in value) + "]"
    if isinstance(value, dict):
        items = (json.dumps(k, ensure_ascii=ascii_only) + ":" + dump(v, ascii_only) for k, v in value.items())
        return "{" + ",".join(items) + "}"
    return json.dumps(value, ensure_ascii=ascii_only)


TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)  # every code point, surrogates too
LONG_TEXT = st.builds(
    lambda c, n: c * n, st.sampled_from(["x", "\u00e9", "\ud800", "\U0001f600", " ", "[CLS]"]), st.integers(129, 20_000)
)
RAW_NUMBERS = ["1" * 5000, "-" + "9" * 400, "1e999", "-1e999", "1E+400", "1e-400", "-0", "NaN", "Infinity", "-Infinity"]
NUMBERS = st.one_of(
    st.integers(-20, 20),
    st.floats(-1e3, 1e3),
    st.floats(),  # NaN, infinities, subnormals, the largest doubles
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**300, 3e38, 1e36, -3.5e38, 5e-324, -0.0]),
    st.sampled_from(RAW_NUMBERS).map(Raw),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), NUMBERS, TEXT, LONG_TEXT, st.sampled_from(["0.5", "NaN", "", "\ud800", "\x00"])
)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=20
)


# Nesting past what a parser recurses through, as raw text (the limit of a body is 65,536 bytes).
def nested(depth: int, kind: str) -> bytes:
    return (("[" * depth + "]" * depth) if kind == "[" else ('{"a":' * depth + "1" + "}" * depth)).encode()


DEEP = st.builds(nested, st.integers(1, 30_000), st.sampled_from("[{"))
CELLS = NUMBERS | SCALARS


def weighted(*choices: tuple[st.SearchStrategy, int]) -> st.SearchStrategy:
    """One of the strategies, each drawn about `weight` times as often as a strategy of weight 1 (st.one_of draws
    a strategy given twice no more often than once)."""
    return st.sampled_from([strategy for strategy, weight in choices for _ in range(weight)]).flatmap(lambda s: s)


@st.composite
def cells(draw, count: int) -> list:
    """`count` numbers of one plausible value (so that the model runs), mostly with none to three hostile ones."""
    values: list = [draw(st.floats(0, 16))] * count
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3])) if count else 0):
        values[draw(st.integers(0, count - 1))] = draw(CELLS)
    return values


def rows(values: list, width: int = 8) -> list:
    return [values[i : i + width] for i in range(0, len(values), width)]


def image() -> st.SearchStrategy:
    """An 8x8 digit (mostly), another shape, flat, or any JSON."""
    others = st.one_of(cells(56).map(rows), cells(64).map(lambda v: rows(v, 4)), cells(64), JSON)
    return weighted((cells(64).map(rows), 4), (others, 1))


def instance(family: str) -> st.SearchStrategy:
    return weighted((TEXT, 4), (LONG_TEXT | JSON, 1)) if family == "text" else image()


def body(values: st.SearchStrategy) -> st.SearchStrategy:
    """Bytes of a request: `values` as JSON (escaped or raw UTF-8), any JSON, deep nesting, or any bytes."""
    encoded = st.builds(lambda v, a: dump(v, a).encode("utf-8", "surrogatepass"), values, st.booleans())
    anything = st.builds(lambda v, a: dump(v, a).encode("utf-8", "surrogatepass"), JSON, st.booleans())
    return weighted((encoded, 9), (anything, 1), (DEEP, 1), (st.binary(max_size=300), 1))


@st.composite
def with_extra(draw, fields: dict) -> dict:
    """`fields`, now and then with one unknown key, or one of them left out."""
    choice = draw(st.integers(0, 9))
    if choice == 0:
        fields[draw(TEXT)] = draw(JSON)
    elif choice == 1 and fields:
        del fields[draw(st.sampled_from(sorted(fields)))]
    return fields


@st.composite
def predict_body(draw, family: str) -> dict:
    instances = draw(weighted((st.lists(instance(family), min_size=1, max_size=4), 5), (JSON, 1)))
    fields: dict[str, Any] = {"instances": instances}
    if draw(st.booleans()):
        count = len(instances) if isinstance(instances, list) else draw(st.integers(0, 3))
        groups = weighted((st.sampled_from(["a", "b", "c"]), 3), (SCALARS | JSON, 1))
        column = st.sampled_from(["group", "other"]) | TEXT
        one_each = st.lists(groups, min_size=count, max_size=count)
        fields["attributes"] = draw(st.dictionaries(column, one_each, max_size=2) | JSON)
    return draw(with_extra(fields))


@st.composite
def oip_body(draw, app: App) -> dict:
    n = draw(weighted((st.integers(1, 4), 4), (st.sampled_from([0, 5]), 1)))
    if app.family == "text":
        texts = weighted((TEXT, 9), (SCALARS, 1))
        shape, datatype, data = [n], "BYTES", draw(st.lists(texts, min_size=n, max_size=n))
    else:
        values = draw(cells(64 * n))
        shape, datatype = [n, 8, 8], "FP32"
        data = draw(st.sampled_from([values, [rows(v) for v in rows(values, 64)], rows(values, 64)]))
    datatypes = ["FP32", "FP16", "FP64", "INT8", "INT64", "UINT8", "BYTES", "BOOL", "fp32", ""]
    tensor = {
        "name": draw(st.just("input") | TEXT),
        "shape": draw(weighted((st.just(shape), 4), (st.lists(st.integers() | st.sampled_from([2**64, -1, 0])), 1))),
        "datatype": draw(weighted((st.just(datatype), 4), (st.sampled_from(datatypes) | TEXT | JSON, 1))),
        "data": draw(weighted((st.just(data), 4), (JSON, 1))),
    }
    if draw(st.integers(0, 7)) == 0:
        tensor["parameters"] = draw(weighted((st.dictionaries(TEXT, SCALARS, max_size=3), 3), (JSON, 1)))
    fields: dict[str, Any] = {"inputs": draw(weighted((st.just([tensor]), 9), (st.lists(st.just(tensor)) | JSON, 1)))}
    outputs = st.lists(st.fixed_dictionaries({"name": weighted((st.sampled_from(OUTPUTS), 3), (TEXT, 1))}), max_size=4)
    optional = {  # mostly of the right type, so that the values inside are what is looked at
        "model_name": weighted((st.just(app.name), 3), (TEXT | JSON, 1)),
        "id": weighted((TEXT, 3), (LONG_TEXT | JSON, 1)),
        "outputs": weighted((outputs, 3), (JSON, 1)),
        "parameters": weighted((st.dictionaries(TEXT, SCALARS, max_size=3), 3), (JSON, 1)),
        "model_version": weighted((TEXT, 3), (JSON, 1)),
    }
    for key, values in optional.items():
        if draw(st.integers(0, 5)) == 0:
            fields[key] = draw(values)
    return draw(with_extra(fields))


@st.composite
def explain_body(draw, app: App) -> dict:
    instances = weighted(
        (st.lists(instance(app.family), min_size=1, max_size=2), 5), (st.lists(instance(app.family)) | JSON, 1)
    )
    fields: dict[str, Any] = {"instances": draw(instances)}
    if draw(st.booleans()):
        fields["target"] = draw(st.sampled_from(app.labels) | TEXT | JSON)
    if draw(st.booleans()):
        fields["n_steps"] = draw(weighted((st.integers(2, 8), 3), (st.integers(-3, 12) | NUMBERS | JSON, 1)))
    return draw(with_extra(fields))


HEADER_TEXT = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
LATIN1_TEXT = st.text(
    st.characters(codec="latin-1", min_codepoint=0x21, exclude_categories=("Cc", "Zs")), min_size=1, max_size=40
)
AUTH_VARIANTS = st.one_of(
    st.sampled_from(
        ["Bearer", f"bearer {KEY}", f"Basic {KEY}", f"Bearer {KEY}x", f"Bearer  {KEY}", KEY, "Bearer \xe9"]
    ).map(lambda v: {"Authorization": v}),
    LATIN1_TEXT.map(lambda v: {"Authorization": v}),
    LATIN1_TEXT.map(lambda v: {"X-API-Key": v}),
)
AUTHS = weighted(
    (st.just(AUTH) | st.just({"X-API-Key": KEY}), 8),
    (st.just({}), 1),
    (AUTH_VARIANTS, 1),
)
CONTENT_TYPES = (
    st.sampled_from(
        [
            "application/json",
            "application/json",
            "text/plain",
            "application/octet-stream",
            "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded",
            "application/json; charset=utf-16",
        ]
    )
    | HEADER_TEXT
)
# Inference-Header-Content-Length: the OIP binary extension's header, on every route.
OTHER_NAMES = ["Content-Encoding", "Accept", "Accept-Encoding", "X-Request-ID", "Inference-Header-Content-Length"]
OTHER_HEADERS = st.dictionaries(
    st.sampled_from(OTHER_NAMES),
    HEADER_TEXT | st.integers(-5, 10**6).map(str),
    max_size=2,
)


@st.composite
def headers(draw) -> dict[str, str]:
    found = {**draw(AUTHS), **draw(weighted((st.just({}), 4), (OTHER_HEADERS, 1)))}
    if draw(st.integers(0, 5)):
        found["Content-Type"] = draw(CONTENT_TYPES)
    return found


def segment(known: list[str]) -> st.SearchStrategy:
    """A path segment: a known one, or any text percent-encoded. Dots are encoded too: the client would resolve
    a `..` segment, and the request would leave the deployment's prefix for Serve's own 404."""
    safe = st.sampled_from(["", "/"])  # with "/", the text's slashes split it into more segments
    encoded = st.builds(lambda t, s: quote(t.encode("utf-8", "surrogatepass"), safe=s).replace(".", "%2E"), TEXT, safe)
    return st.sampled_from(known) | encoded | st.sampled_from(["", "%2E%2E", "%00", "%2F", "%ff", "%"])


def posts(path: st.SearchStrategy, values: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(Call, st.just("POST"), path, headers(), body(values), st.integers(0, 9).map(lambda i: i == 0))


def fuzz(app: App, calls: st.SearchStrategy, fuzzer: str, examples: int, after=None) -> None:
    """Send `examples` requests drawn from `calls` to `app`; `after(call, reply)` looks further at each answer."""

    @settings(FUZZ, max_examples=examples)
    @given(calls)
    def run(call: Call) -> None:
        reply = send(app, call, fuzzer)
        if after is not None:
            after(call, reply)

    run()


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
