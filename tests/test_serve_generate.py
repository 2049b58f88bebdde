"""Ray tier: a causal LM served through the OpenAI-compatible API, talked to with the official `openai` client.

One tiny-gpt run (trained in-process, seconds) and one deployment serve every test of the module: a Serve of its own,
started and shut down here, so that the per-test application clean-up of the other serving modules leaves it be.
The model's context is widened past what it was trained on, so that a stream can run long enough to be cut.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import torch

from steward.serve.deploy import deploy
from steward.serve.model import ModelSource
from steward.serve.quantize import GateResult, check_int8, quantize_int8
from steward.spec.serve import ServeSpec
from tests.conftest import free_port
from tests.serving import serve_mode_as_the_cli_picks_it, trained_run, wait_for

pytestmark = pytest.mark.slow

KEY = "generate-test-key"
CONTEXT = 1024
PROMPTS = ["the movie was", "yall lowkey great food", "bad", "indeed the service was very", "love it", "we felt"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate-run")
    overrides = [
        "data.options.num_samples=300",
        f"model.params.config_overrides={{max_position_embeddings: {CONTEXT}}}",
    ]
    return trained_run(root, "tiny-gpt.yaml", *overrides, epochs=2)


@pytest.fixture(scope="module")
def endpoint(lm_run, ray_local, tmp_path_factory):
    """The run deployed as the CLI would serve it, with an API key file; yields the base URL (route prefix)."""
    from ray import serve

    spec, run_dir = lm_run
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"{KEY}\n")
    limits = {"max_new_tokens": CONTEXT, "max_prompt_tokens": 200}
    # what is served as generated, unwatched: the text compared with offline generate() (tests/test_serve_lm_watch.py
    # has the masked and monitored deployment)
    fields = {"num_cpus": 0.5, "auth": {"api_keys_file": str(keys)}, "generation": limits, "output_pii": "allow"}
    cfg = ServeSpec.model_validate(spec.serve.model_dump(exclude_unset=True) | fields)
    with serve_mode_as_the_cli_picks_it(cfg):
        url = deploy(spec.model_copy(update={"serve": cfg, "monitor": None}), run_dir, port=free_port()).url
        try:
            yield url
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def client(endpoint):
    return openai.OpenAI(base_url=f"{endpoint}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(lm_run):
    """The run's model and tokenizer, loaded here: what the served text is compared with."""
    from steward.serve.lm import open_language_model

    spec, run_dir = lm_run
    return open_language_model(ModelSource(str(run_dir), "transformer", spec.data.max_length, "offline"))


def prompt_ids(lm, text):
    ids = lm.tokenizer(text)["input_ids"]
    assert ids[-1] == lm.tokenizer.sep_token_id  # training's texts end in [SEP]; a prompt goes on instead
    return ids[:-1]


def greedy(lm, text, n):
    """Hugging Face's own generate(): n greedy tokens, the end-of-text token suppressed."""
    ids = torch.tensor([prompt_ids(lm, text)])
    with torch.inference_mode():
        out = lm.hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            suppress_tokens=sorted(lm.eos),
            pad_token_id=0,
        )
    return lm.decode(out[0, ids.shape[1] :].tolist())


def no_end(lm):
    return {str(token): -100 for token in lm.eos}


def info(endpoint):
    return requests.get(f"{endpoint}/info", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()


def test_completions_and_chat_equal_offline_generate_with_usage(client, offline):
    reply = client.completions.create(
        model="tiny-gpt", prompt=PROMPTS[0], max_tokens=12, temperature=0, logit_bias=no_end(offline)
    )
    assert reply.choices[0].text == greedy(offline, PROMPTS[0], 12)
    assert reply.choices[0].finish_reason == "length"
    prompt_tokens = len(prompt_ids(offline, PROMPTS[0]))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 12)
    assert reply.usage.total_tokens == prompt_tokens + 12
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "the food"}]
    chat = client.chat.completions.create(
        model="tiny-gpt", messages=messages, max_tokens=6, temperature=0, logit_bias=no_end(offline)
    )
    templated = "system: be kind\nuser: the food\nassistant:"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == greedy(offline, templated, 6)
    assert chat.usage.prompt_tokens == len(prompt_ids(offline, templated)) and chat.usage.completion_tokens == 6
    assert [m.id for m in client.models.list()] == ["tiny-gpt"]


def test_concurrent_streams_are_batched_and_equal_the_whole_replies(client, offline, endpoint):
    def stream(prompt):
        chunks = list(
            client.completions.create(
                model="tiny-gpt",
                prompt=prompt,
                max_tokens=40,
                temperature=0,
                logit_bias=no_end(offline),
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        return chunks

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        streamed = list(pool.map(stream, PROMPTS))
    for prompt, chunks in zip(PROMPTS, streamed, strict=True):
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == greedy(offline, prompt, 40)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == "length" and not any(finishes[:-1])
        assert chunks[-1].usage.completion_tokens == 40 and not chunks[-1].choices
    assert info(endpoint)["replica"]["counts"]["largest_batch"] > 1  # they shared forward passes
    chat = client.chat.completions.create(
        model="tiny-gpt",
        messages=[{"role": "user", "content": "bad"}],
        max_tokens=5,
        temperature=0,
        stream=True,
        logit_bias=no_end(offline),
    )
    deltas = [c.choices[0].delta for c in chat]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == greedy(offline, "user: bad\nassistant:", 5)


def test_stop_sequences_end_the_text_before_them(client, offline):
    expected = greedy(offline, PROMPTS[3], 30)
    stop = expected[len(expected) // 2 : len(expected) // 2 + 3]
    for stream in (False, True):
        reply = client.completions.create(
            model="tiny-gpt",
            prompt=PROMPTS[3],
            max_tokens=30,
            temperature=0,
            stop=[stop, "never said"],
            logit_bias=no_end(offline),
            stream=stream,
        )
        chunks = list(reply) if stream else [reply]
        assert "".join(c.choices[0].text for c in chunks) == expected[: expected.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_repeats_a_sampled_text(client):
    def sample(seed):
        reply = client.completions.create(
            model="tiny-gpt",
            prompt="the",
            max_tokens=20,
            temperature=1.0,
            top_p=0.9,
            seed=seed,
            extra_body={"top_k": 50},
        )
        return reply.choices[0].text

    assert sample(7) == sample(7)


def test_a_client_gone_mid_stream_is_dropped_from_the_batch(endpoint, offline, client):
    before = info(endpoint)["replica"]["counts"]
    body = {
        "model": "tiny-gpt",
        "prompt": "the",
        "max_tokens": CONTEXT - 10,
        "stream": True,
        "logit_bias": no_end(offline),
    }
    with requests.post(
        f"{endpoint}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, stream=True, timeout=30
    ) as response:
        assert response.status_code == 200
        events = (line for line in response.iter_lines() if line.startswith(b"data: "))
        assert all(json.loads(next(events)[6:])["choices"] for _ in range(3))  # three events read, then gone
    counts = wait_for(lambda: (c := info(endpoint)["replica"])["running"] == 0 and c["counts"], 30, "the drop")
    assert counts.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert counts["tokens"] - before["tokens"] < CONTEXT - 10  # it stopped before its max_tokens
    assert counts.get("length", 0) == before.get("length", 0)
    # and the replica goes on serving
    assert client.completions.create(model="tiny-gpt", prompt="good", max_tokens=3).usage.completion_tokens <= 3


BAD = [
    ({"max_tokens": CONTEXT + 1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"n": 2}, "n"),
    ({"seed": -1}, "seed"),
    ({"logit_bias": {"99999": 5}}, "logit_bias.99999"),
    ({"prompt": "good " * 2000}, "prompt"),
    ({"prompt": ""}, None),  # a prompt of no text still holds its leading token: answered
]


def test_bad_parameters_are_400_naming_the_field(client, endpoint):
    for fields, param in BAD:
        request = {"model": "tiny-gpt", "prompt": "the", "max_tokens": 2} | fields
        if "top_k" in request:  # not one of the client's own parameters
            request["extra_body"] = {"top_k": request.pop("top_k")}
        if param is None:
            assert client.completions.create(**request).choices[0].finish_reason in ("stop", "length")
            continue
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(**request)
        assert refused.value.param == param, (fields, refused.value.body)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny-gpt", prompt="the", extra_body={"presence_penalty": 1.0})
    assert refused.value.param == "presence_penalty"
    with pytest.raises(openai.NotFoundError) as refused:
        client.completions.create(model="gpt-4", prompt="the")
    assert refused.value.param == "model"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for raw, param in [
        ('{"model": "tiny-gpt", "prompt": "\\ud800"}', "prompt"),
        ("[1]", "body"),
        ("{", "body"),
        ('{"model": "tiny-gpt", "messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role"),
        ('{"model": "tiny-gpt", "messages": []}', "messages"),
    ]:
        path = "chat/completions" if "messages" in raw else "completions"
        reply = requests.post(f"{endpoint}/v1/{path}", data=raw.encode(), headers=headers, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text


def test_no_key_is_401_on_every_route_but_health(endpoint):
    wrong = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="tiny-gpt", prompt="the")
    for method, path in [
        ("post", "/v1/completions"),
        ("post", "/v1/chat/completions"),
        ("get", "/v1/models"),
        ("get", "/info"),
    ]:
        reply = getattr(requests, method)(f"{endpoint}{path}", json={}, timeout=30)
        assert reply.status_code == 401 and reply.json()["error"]["param"] == "authorization"
    assert requests.get(f"{endpoint}/healthz", timeout=30).status_code == 200


def test_int8_is_gated_on_perplexity(lm_run):
    spec, run_dir = lm_run
    int8_spec = spec.model_copy(update={"serve": spec.serve.model_copy(update={"quantize": "int8"})})
    gate = check_int8(int8_spec, run_dir)
    assert gate.metric == "perplexity" and gate.passed and gate.int8 != gate.fp32
    assert json.loads(json.dumps(gate.to_dict()))["int8_perplexity"] == gate.int8
    assert not GateResult("validation", 10.0, 10.6, 0.05, metric="perplexity").passed
    from transformers.pytorch_utils import Conv1D

    from steward.evaluate.run import load_servable

    model, _ = load_servable(run_dir / "model")
    assert not any(isinstance(m, Conv1D) for m in quantize_int8(model).modules())  # GPT-2's layers are int8 too
