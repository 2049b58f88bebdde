"""Ray tier: a language model watched in production. A tiny GPT trained on text with a planted e-mail address is
prompted into reproducing it: the leak is counted, alerted (events, audit chain, Prometheus) and masked before it
reaches the client (or, blocked, ends the completion); prompts unlike the validation split's raise a drift alert
within two windows.

One trained run (in-process, seconds) and one deployment on the shared Ray, talked to with the official `openai`
client; the windows are counted exactly (40 completions each), so each phase knows which windows are its own.
"""

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pandas as pd
import pytest
import ray
import requests

from steward.govern import audit
from steward.serve.deploy import deploy
from steward.spec.monitor import MonitorSpec
from steward.spec.serve import ServeSpec
from tests.serving import serve_mode_as_the_cli_picks_it, trained_run, wait_for

pytestmark = pytest.mark.slow

KEY = "watch-test-key"
EMAIL = "jane.doe@example.com"
LEAKY = f"for refunds please contact {EMAIL} today"
WINDOW = 40
ADJ = ["good", "bad", "quiet", "loud", "warm", "cold", "fresh", "stale", "kind", "rude"]
NOUN = ["movie", "meal", "room", "service", "staff", "view", "song", "train", "book", "park"]


def leaky_texts(n: int = 600) -> list[str]:
    rng = np.random.default_rng(0)
    return [
        LEAKY
        if i % 3 == 0
        else f"the {rng.choice(NOUN)} was {rng.choice(ADJ)} and the {rng.choice(NOUN)} was {rng.choice(ADJ)}"
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def leaky_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("leaky-run")
    pd.DataFrame({"text": leaky_texts()}).to_csv(root / "leaky.csv", index=False)
    overrides = [f"data.source=file:{root}/leaky.csv", "data.input_column=text", "data.options={}", "privacy=null"]
    return trained_run(root, "tiny-gpt.yaml", *overrides, epochs=3)


def report(url):
    return requests.get(f"{url}/monitor", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()


def checks(window):
    return {c["name"]: c for c in window["checks"]}


def closed(url, count):
    """The report once `count` windows have closed (a push may still be on its way)."""
    return wait_for(lambda: (r := report(url))["windows_closed"] >= count and r, 60, f"{count} closed windows")


def complete(client, prompts, **sampling):
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda p: client.completions.create(model="tiny-gpt", prompt=p, **sampling), prompts))


def halves(texts, tokenizer):
    """Each text's first half as a prompt: the validation split's prompts at training's end were made so."""
    out = []
    for text in texts:
        ids = tokenizer(text)["input_ids"][1:-1]  # without the leading and the end-of-text tokens
        out.append(tokenizer.decode(ids[: (len(ids) + 2) // 2 - 1], clean_up_tokenization_spaces=False))
    return out


def test_a_planted_leak_is_masked_counted_alerted_and_prompt_drift_alerts_within_two_windows(
    leaky_run, ray_local, serve_port, tmp_path
):
    spec, run_dir = leaky_run
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY}\n")
    fields = {"num_cpus": 0.5, "auth": {"api_keys_file": str(keys)}, "output_pii": "mask"}
    cfg = ServeSpec.model_validate(spec.serve.model_dump(exclude_unset=True) | fields)
    monitor = MonitorSpec.model_validate(
        {"drift": {"min_records": 20}, "leaks": {}, "window": {"size": WINDOW}, "push_interval_s": 0.5}
    )
    job = spec.model_copy(update={"serve": cfg, "monitor": monitor})
    with serve_mode_as_the_cli_picks_it(cfg):
        url = deploy(job, run_dir, port=serve_port).url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)

    # 1. Prompted into its training text, the model writes the address: the client never receives it.
    replies = complete(client, ["for refunds please contact"] * (2 * WINDOW - 1), max_tokens=12, temperature=0)
    stream = client.completions.create(
        model="tiny-gpt", prompt="for refunds please contact", max_tokens=12, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    for text in [r.choices[0].text for r in replies] + [streamed]:
        assert "<EMAIL>" in text and EMAIL not in text and "@" not in text, text
    leaked = closed(url, 2)
    for window in leaked["recent"][-2:]:
        assert checks(window)["pii:email"]["value"] == WINDOW and checks(window)["pii:email"]["status"] == "fail"
        assert checks(window)["regurgitation"]["value"] > 0.5  # the address and its sentence, verbatim
    alerts = {a["name"]: a for a in leaked["alerts"]}
    assert alerts["pii:email"]["kind"] == "leak" and alerts["pii:email"]["value"] == WINDOW
    assert "regurgitation" in alerts

    def logged():
        events = (run_dir / "monitor" / "tiny-gpt" / "events.jsonl").read_text().splitlines()
        audited = audit.history(audit.log_path(spec.output_dir), deployment="tiny-gpt")
        return any(e["event"] == "alert" and e["name"] == "pii:email" for e in map(json.loads, events)) and any(
            e["event"] == "monitor.alert.raised" and e["name"] == "pii:email" for e in audited
        )

    wait_for(logged, 30, "the leak alert in events.jsonl and the audit chain")
    port = ray.nodes()[0]["MetricsExportPort"]

    def scraped():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        leak = re.search(r'^ray_steward_monitor_leak\{[^}]*check="pii:email"[^}]*\} (\S+)$', text, re.M)
        alert = re.search(r'^ray_steward_monitor_alert_open\{[^}]*check="pii:email"[^}]*\} (\S+)$', text, re.M)
        return leak and alert and (float(leak[1]), float(alert[1]))

    assert wait_for(scraped, 60, "the leak in Prometheus") == (WINDOW, 1.0)

    # 2. Prompts like the validation split's: the prompt checks pass (and the leak phase's prompt-length alert,
    # all one prompt, recovers).
    complete(client, halves(leaky_texts(3 * WINDOW)[2 * WINDOW :], _tokenizer(run_dir)))
    usual = closed(url, 3)["recent"][-1]
    assert checks(usual)["psi:text.length"]["status"] == "ok", checks(usual)
    assert "psi:text.length" not in {a["name"] for a in report(url)["alerts"]}

    # 3. Prompts in another script: longer in tokens and elsewhere in embedding space; alerted by the second window.
    rng = np.random.default_rng(1)
    foreign = ["".join(rng.choice(list("ÆØÅ日本語Ωß∑"), 5)) + " " + rng.choice(NOUN) for _ in range(2 * WINDOW)]
    complete(client, foreign[:WINDOW])
    first = closed(url, 4)["recent"][-1]
    assert checks(first)["psi:text.length"]["status"] == "fail" and checks(first)["mmd:embedding"]["status"] == "fail"
    complete(client, foreign[WINDOW:])
    drifted = closed(url, 5)
    assert {"psi:text.length", "mmd:embedding"} <= {a["name"] for a in drifted["alerts"] if a["kind"] == "drift"}

    # 4. output_pii: block ends the completion before the address, streamed or not.
    blocking = cfg.model_copy(update={"output_pii": "block"})
    with serve_mode_as_the_cli_picks_it(blocking):
        deploy(job.model_copy(update={"serve": blocking}), run_dir, port=serve_port)
    whole = client.completions.create(
        model="tiny-gpt", prompt="for refunds please contact", max_tokens=12, temperature=0
    )
    chunks = list(
        client.completions.create(
            model="tiny-gpt", prompt="for refunds please contact", max_tokens=12, temperature=0, stream=True
        )
    )
    assert whole.choices[0].finish_reason == "content_filter" and "@" not in whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert "@" not in "".join(c.choices[0].text for c in chunks)


def _tokenizer(run_dir):
    from steward.data.tokenizer import load_tokenizer

    return load_tokenizer(str(run_dir / "model" / "tokenizer"))
