"""Helpers for the fuzz tests of serving (tests/test_serve_fuzz.py): the deployments' handle, hostile-request
strategies for hypothesis, and the checks every answer must pass."""

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from steward.serve.protocol import OUTPUTS

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
