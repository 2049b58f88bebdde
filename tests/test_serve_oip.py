"""Open Inference Protocol conformance: the binary tensor data extension and the two official clients, unmodified.

Fast tier: bodies made and replies read by the clients' own codecs (`tritonclient.http`'s `generate_request_body` and
`parse_response_body`, KServe's `InferRequest.to_rest` and `InferResponse.from_bytes`), and hostile binary bodies,
through the server's parser without Ray. Ray tier (slow): the quickstart CNN behind a real Ray Serve, with the
clients' defaults and the route prefix as their base path, and the hostile bodies over HTTP.
"""

import asyncio
import json
import struct

import httpx
import numpy as np
import pytest
import requests
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kserve import InferenceRESTClient, RESTConfig
from kserve import InferInput as KServeInput
from kserve import InferRequest as KServeRequest
from kserve import InferResponse as KServeResponse
from kserve.protocol.infer_type import RequestedOutput
from tritonclient.utils import InferenceServerException

from steward.serve.oip_binary import HEADER, binary_outputs, oip_reply, read_request
from steward.serve.protocol import BadRequest, InferResponse, oip_instances, oip_outputs, requested_outputs
from tests.serving import offline_probabilities, post, serve_it, trained_run, validation_inputs
from tests.test_serve import _serve_mode_as_the_cli_picks_it  # noqa: F401 -- the same Serve mode, so the same Ray

IMAGE = (8, 8)  # the quickstart CNN's input: digits, 8x8
LABELS = [str(i) for i in range(10)]


def triton_body(array, datatype, outputs=None):
    """(body, Inference-Header-Content-Length) exactly as tritonclient sends `array` with its defaults."""
    tensor = triton.InferInput("input", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
    return body, None if json_size is None else str(json_size)


def as_served(raw, declared, modality="image", shape=IMAGE):
    """What the infer route makes of a body before the model: (instances, the outputs to send as binary)."""
    request, data = read_request(raw, declared, max_bytes=4_000_000)
    binary = binary_outputs(request, requested_outputs(request))
    return oip_instances(request, modality, shape, data[0]), binary


def reply(probabilities, names=("probabilities", "class_id", "label"), binary=frozenset()):
    outputs = oip_outputs(probabilities, LABELS, list(names))
    response = InferResponse(model_name="m", model_version="v", id="r", parameters={"x": 1}, outputs=outputs)
    return oip_reply(response, set(binary))


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int32", "uint8"])
def test_tritonclient_binary_inputs_decode_to_the_array_it_sent(dtype):
    array = (np.arange(3 * 64).reshape(3, *IMAGE) % 17).astype(dtype)
    body, declared = triton_body(array, triton.np_to_triton_dtype(array.dtype))
    assert declared is not None  # binary: the JSON is followed by the array's bytes
    instances, binary = as_served(body, declared)
    np.testing.assert_array_equal(instances, array.astype(np.float32))
    assert binary == {"probabilities", "class_id", "label"}  # tritonclient asks for binary outputs by default


def test_bytes_inputs_from_both_clients_decode_to_the_texts():
    texts = ["a digit", "", "été ünïcode", "x" * 300]
    array = np.array(texts, dtype=object)
    body, declared = triton_body(array, "BYTES")
    assert as_served(body, declared, "text", (32,))[0] == texts
    tensor = KServeInput("input", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(array)  # binary by default
    body, json_length = KServeRequest(model_name="m", infer_inputs=[tensor]).to_rest()
    assert as_served(body, str(json_length), "text", (32,))[0] == texts


def test_binary_replies_read_back_in_both_clients():
    probabilities = np.random.default_rng(0).dirichlet(np.ones(10), size=4).astype(np.float32)
    response = reply(probabilities, binary={"probabilities", "label"})
    assert response.media_type == "application/octet-stream"
    length = int(response.headers[HEADER])
    assert json.loads(response.body[:length])["outputs"][0]["parameters"] == {"binary_data_size": 4 * 4 * 10}
    result = triton.InferenceServerClient.parse_response_body(response.body, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    assert result.as_numpy("label").tolist() == [LABELS[i].encode() for i in probabilities.argmax(-1)]
    assert result.get_output("class_id")["data"] == probabilities.argmax(-1).tolist()  # asked for in JSON
    outputs = {o.name: o for o in KServeResponse.from_bytes(response.body, length).outputs}
    np.testing.assert_array_equal(outputs["probabilities"].as_numpy(), probabilities)
    assert outputs["label"].data == [LABELS[i] for i in probabilities.argmax(-1)]
    assert HEADER.lower() not in reply(probabilities).headers  # nothing asked in binary: plain JSON


def test_each_output_s_binary_data_overrides_the_request_s_default():
    x = np.zeros((1, *IMAGE), np.float32)
    body, declared = triton_body(x, "FP32", [triton.InferRequestedOutput("label", binary_data=False)])
    assert as_served(body, declared)[1] == set()
    asked = [triton.InferRequestedOutput("label"), triton.InferRequestedOutput("class_id", binary_data=False)]
    assert as_served(*triton_body(x, "FP32", asked))[1] == {"label"}
    json_only = {"inputs": [{"name": "x", "shape": [1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
    assert as_served(json.dumps(json_only).encode(), None)[1] == set()


def oip_json(tensor, **request):
    return json.dumps({"inputs": [{"name": "input", "shape": [2, 8, 8], "datatype": "FP32", **tensor}], **request})


def framed(header, tail=b""):
    """A body of JSON `header` (text or bytes) then `tail`, with its Inference-Header-Content-Length."""
    header = header.encode() if isinstance(header, str) else header
    return header + tail, str(len(header))


GOOD, GOOD_LENGTH = triton_body(np.zeros((2, *IMAGE), np.float32), "FP32")
PIXELS = np.zeros(2 * 64, np.float32).tobytes()  # 512 bytes: FP32 [2, 8, 8]


def pixels(size, tail=PIXELS, **request):
    """FP32 [2, 8, 8] claiming `size` bytes of binary data, then `tail`; `request`: more top-level keys."""
    return framed(oip_json({"parameters": {"binary_data_size": size}}, **request), tail)


def texts(size, tail, shape=(1,)):
    """BYTES `shape` claiming `size` bytes of binary data, then `tail`."""
    tensor = {"datatype": "BYTES", "shape": list(shape), "parameters": {"binary_data_size": size}}
    return framed(oip_json(tensor), tail)


def asking(**parameters):
    return {"outputs": [{"name": "label", "parameters": parameters}]}


SIZE, ONE = "inputs[0].parameters.binary_data_size", struct.pack("<I", 1) + b"a"
# (case, body, Inference-Header-Content-Length, status, field): every one refused by the part at fault
HOSTILE = [
    ("header past the end", GOOD, str(len(GOOD) + 1), 400, HEADER),
    ("header not a number", GOOD, "12a", 400, HEADER),
    ("header negative", GOOD, "-5", 400, HEADER),
    ("header of 5000 digits", GOOD, "9" * 5000, 400, HEADER),
    ("header cuts the JSON short", GOOD, str(int(GOOD_LENGTH) - 1), 400, "body"),
    ("bytes no tensor claims", GOOD + b"\0" * 8, GOOD_LENGTH, 400, "body"),
    ("binary without the header", GOOD, None, 400, "body"),
    ("non-UTF-8 JSON", *framed(b'{"inputs": "\xff"}', PIXELS), 400, "body"),
    ("size not the shape's", *pixels(500, PIXELS[:500]), 422, SIZE),
    ("size negative", *pixels(-4), 422, SIZE),
    ("size huge", *pixels(10**30), 422, SIZE),
    ("size a boolean", *pixels(True), 422, SIZE),
    ("size a string", *pixels("512"), 422, SIZE),
    ("size past the body", *pixels(1024), 422, SIZE),
    ("size, no binary sent", *pixels(512, b""), 422, SIZE),
    ("data and binary", *framed(oip_json({"data": [0.0] * 128, "parameters": {"binary_data_size": 512}}), PIXELS),
     422, "inputs[0].data"),
    ("neither data nor binary", oip_json({}).encode(), None, 422, "inputs[0].data"),
    ("no binary form", *framed(oip_json({"datatype": "BF16", "parameters": {"binary_data_size": 256}}), PIXELS[:256]),
     422, "inputs[0].datatype"),
    ("negative dimension", *framed(oip_json({"shape": [-2, 8, 8], "parameters": {"binary_data_size": 512}}), PIXELS),
     422, "inputs[0].shape"),
    ("wrong shape", *framed(oip_json({"shape": [2, 64], "parameters": {"binary_data_size": 512}}), PIXELS),
     422, "inputs[0].shape"),
    ("BYTES length past the end", *texts(7, struct.pack("<I", 100) + b"abc"), 422, "inputs[0].data[0]"),
    ("BYTES length cut off", *texts(2, b"\1\0"), 422, "inputs[0].data[0]"),
    ("BYTES not UTF-8", *texts(6, struct.pack("<I", 2) + b"\xff\xfe"), 422, "inputs[0].data[0]"),
    ("BYTES more than the shape", *texts(10, ONE * 2), 422, "inputs[0].data"),
    ("BYTES fewer than the shape", *texts(5, ONE, shape=(3,)), 422, "inputs[0].data"),
    ("BYTES to an image model", *texts(5, ONE), 422, "inputs[0].datatype"),
    ("binary_data_output not a bool", *pixels(512, parameters={"binary_data_output": "yes"}),
     422, "parameters.binary_data_output"),
    ("binary_data not a bool", *pixels(512, **asking(binary_data=1)), 422, "outputs[0].parameters.binary_data"),
    ("classification asked", *pixels(512, **asking(classification=3)), 422, "outputs[0].parameters.classification"),
    ("shared memory input", *framed(oip_json({"parameters": {"shared_memory_region": "r"}})),
     422, "inputs[0].parameters.shared_memory_region"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "raw", "declared", "status", "field"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_binary_bodies_are_refused_naming_the_part(case, raw, declared, status, field):
    with pytest.raises(BadRequest) as refused:
        as_served(raw, declared)
    assert (refused.value.status, refused.value.field) == (status, field), refused.value
    assert len(refused.value.message) < 300  # a hostile value is described, never echoed back in full


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.integers(0, len(GOOD)),
    junk=st.binary(max_size=64),
    flips=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), max_size=4),
    declared=st.one_of(st.none(), st.integers(-10, len(GOOD) + 80).map(str), st.text(max_size=20)),
)
def test_mangled_binary_bodies_get_a_4xx_or_an_answer_never_another_error(cut, junk, flips, declared):
    raw = bytearray(GOOD[:cut] + junk)
    for at, value in flips:
        if at < len(raw):
            raw[at] = value
    try:
        as_served(bytes(raw), declared)
    except BadRequest as err:
        assert 400 <= err.status < 500


# -- Ray tier: the clients against a real Ray Serve -------------------------------------------------------------
KEY = "oip-key-123"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {"cnn": trained_run(tmp_path_factory.mktemp("oip"), "quickstart.yaml", epochs=2)}


@pytest.fixture
def served(runs, serve_port, tmp_path):
    """The quickstart CNN behind Serve with an API key: spec, base URL (with the route prefix), the instances sent,
    their offline probabilities, and the class names."""
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY + "\n")
    url = serve_it(runs, serve_port, "cnn", auth={"api_keys_file": str(keys)}, max_instances=4, max_body_bytes=65_536)
    spec, run_dir = runs["cnn"]
    instances = validation_inputs(spec, 4)
    x = np.asarray(instances, dtype=np.float32)
    labels = requests.get(f"{url}/info", headers={"X-API-Key": KEY}, timeout=60).json()["labels"]
    return spec, url, x, offline_probabilities(run_dir, spec, instances), labels


@pytest.mark.slow
def test_tritonclient_with_its_defaults_and_the_route_prefix(served, serve_port):
    spec, url, x, expected, labels = served
    key = {"Authorization": f"Bearer {KEY}"}
    client = triton.InferenceServerClient(f"127.0.0.1:{serve_port}/cnn")  # a path after the host is its base path
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(spec.name)
    assert not client.is_model_ready("no-such-model")
    assert "binary_tensor_data" in client.get_server_metadata(headers=key)["extensions"]
    metadata = client.get_model_metadata(spec.name, headers=key)
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, *IMAGE]}]
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # binary_data=True: the default
    result = client.infer(spec.name, [tensor], headers=key)
    assert result.get_output("probabilities")["parameters"] == {"binary_data_size": expected.size * 4}
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    assert result.as_numpy("class_id").tolist() == expected.argmax(-1).tolist()
    assert result.as_numpy("label").tolist() == [labels[i].encode() for i in expected.argmax(-1)]
    assert len(result.get_response()["parameters"]["request_ids"]) == len(x)
    asked = [triton.InferRequestedOutput("class_id", binary_data=False)]
    only = client.infer(spec.name, [tensor], outputs=asked, request_id="mine", headers=key).get_response()
    assert only["id"] == "mine" and only["outputs"][0]["data"] == expected.argmax(-1).tolist()
    with pytest.raises(InferenceServerException) as refused:
        client.infer(spec.name, [tensor])  # no key
    assert refused.value.status() == "401" and "authorization" in refused.value.message()
    client.close()


@pytest.mark.slow
def test_kserve_rest_client_v2_with_the_route_prefix(served):
    spec, url, x, expected, labels = served

    async def session():
        async with InferenceRESTClient(RESTConfig(protocol="v2")) as client:
            key = {"X-API-Key": KEY}
            ready = [await client.is_server_live(url), await client.is_server_ready(url)]
            ready += [await client.is_model_ready(url, spec.name), not await client.is_model_ready(url, "nope")]
            replies, framing = [], []
            for parameters in (None, {"binary_data_output": True}):
                tensor = KServeInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)  # binary by default
                request, seen = KServeRequest(spec.name, [tensor], parameters=parameters), {}
                replies.append(await client.infer(url, request, spec.name, dict(key), response_headers=seen))
                framing.append((seen["content-type"], HEADER.lower() in seen))
            asked = KServeRequest(spec.name, [KServeInput("input", list(x.shape), "FP32", data=x)],
                                  request_outputs=[RequestedOutput("label")])  # fmt: skip
            replies.append(await client.infer(url, asked, model_name=spec.name, headers=dict(key)))
            with pytest.raises(httpx.HTTPStatusError) as refused:
                await client.infer(url, asked, model_name=spec.name)  # no key
            return ready, replies, framing, refused.value

    ready, (as_json, as_binary, only_label), framing, refused = asyncio.run(session())
    assert ready == [True] * 4
    assert framing == [("application/json", False), ("application/octet-stream", True)]
    for response in (as_json, as_binary):
        outputs = {o.name: o for o in response.outputs}
        np.testing.assert_allclose(outputs["probabilities"].as_numpy(), expected, atol=1e-5)
        assert outputs["class_id"].as_numpy().tolist() == expected.argmax(-1).tolist()
        assert outputs["label"].data == [labels[i] for i in expected.argmax(-1)]
    assert [o.name for o in only_label.outputs] == ["label"]
    assert refused.response.status_code == 401  # httpx.HTTPStatusError, the client's error for a refusal


@pytest.mark.slow
def test_hostile_binary_bodies_over_http_get_their_4xx_and_the_next_request_succeeds(served):
    spec, url, x, expected, _ = served
    infer, key = f"{url}/v2/models/{spec.name}/infer", {"X-API-Key": KEY, "Content-Type": "application/octet-stream"}
    nan, overflow = x.copy(), x.copy()
    nan[1, 2, 3], overflow[2] = np.nan, 3e38
    too_many, over_limit = np.zeros((5, *IMAGE), np.float32), np.zeros((300, *IMAGE), np.float32)
    cases = [(case, raw, declared, status, field) for case, raw, declared, status, field, *_ in HOSTILE] + [
        ("NaN in binary", *triton_body(nan, "FP32"), 422, "inputs[0].data[1]"),
        ("overflows the model", *triton_body(overflow, "FP32"), 422, "inputs[0].data[2]"),
        ("more instances than max_instances", *triton_body(too_many, "FP32"), 413, "inputs[0].shape"),
        ("over max_body_bytes", *triton_body(over_limit, "FP32"), 413, "body"),
    ]
    good, good_length = triton_body(x, "FP32")
    for case, raw, declared, status, field in cases:
        headers = key if declared is None else {**key, HEADER: declared}
        refused = post(infer, data=raw, headers=headers)
        assert (refused.status_code, refused.json().get("field")) == (status, field), f"{case}: {refused.text}"
        answered = post(infer, data=good, headers={**key, HEADER: good_length})
        assert answered.status_code == 200, f"after {case}: {answered.text}"
    length = int(answered.headers[HEADER])
    result = triton.InferenceServerClient.parse_response_body(answered.content, header_length=length)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
