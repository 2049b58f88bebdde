"""Helpers for the serving tests: real trained runs made fast (plain torch, no Ray Train), one Serve per module,
deploying, offline predictions to compare with, and polling."""

import contextlib
import os
import shutil
import time
from dataclasses import replace

import requests
import torch

from steward.data import load_splits, prepare_data, raw_inputs
from steward.evaluate.run import evaluate_run, load_servable
from steward.models import build_model, save_model, task_loss
from steward.runs import create_run, set_status
from steward.serve.deploy import deploy
from steward.serve.model import load_served_model
from steward.serve.quantize import quantize_int8
from steward.spec import load_job
from steward.spec.serve import ServeSpec
from tests.conftest import JOBS

# Training's own workers run one torch thread each (distributed.cpus_per_worker: 1); a CPU kernel's summation
# order, and so the trained weights, depends on the thread count.
THREADS = 1


@contextlib.contextmanager
def deterministic_torch(seed: int, threads: int = THREADS):
    """torch seeded, on `threads` threads, deterministic algorithms only; the caller's settings and RNG come back.

    Whatever ran before (a test that set torch to 1 thread, one that drew from the global RNG) changes nothing
    inside, and nothing inside leaks out to the tests after.
    """
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(saved[0])
            torch.use_deterministic_algorithms(saved[1], warn_only=warn_only)


def trained_run(tmp_path, job: str, *overrides: str, epochs: int = 3, lr: float = 3e-3):
    """A succeeded run folder shaped exactly like training's: spec.yaml, status, model/ (+ tokenizer), metrics.

    The model is trained in-process with plain torch for a few epochs: real weights and real accuracy, seconds
    instead of a Ray Train job. The same arguments give the same weights whatever ran before (seeded, fixed
    threads; the batches are in row order) -- except for text jobs, whose trained WordPiece/BPE vocabulary
    differs from one training to the next (huggingface/tokenizers#1794). Returns (spec, run_dir).
    """
    spec = load_job(JOBS / job, [f"output_dir={tmp_path / 'runs'}", *overrides])
    with deterministic_torch(spec.seed):
        run_dir = create_run(spec)
        info = prepare_data(spec, run_dir)
        model = build_model(spec.model, info)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        train = load_splits(spec, info)["train"]
        for _ in range(epochs):
            model.train()
            for batch in train.batches(32):
                loss = task_loss(spec.model.task, model(batch["inputs"], batch.get("attention_mask")), batch["labels"])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        exported = info
        if info.tokenizer_dir:
            shutil.copytree(info.tokenizer_dir, run_dir / "model" / "tokenizer")
            exported = replace(info, tokenizer_dir="tokenizer")
        save_model(run_dir / "model", model.eval(), model.state_dict(), spec.model, exported)
        result = evaluate_run(run_dir, spec)
    set_status(run_dir, "succeeded", headline=result["overall"])
    return spec, run_dir


def wait_for(condition, timeout: float, what: str, every: float = 0.1):
    """Poll `condition()` until it returns a truthy value (returned) or `timeout` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)


def serve_it(runs, port, family, **serve_fields):
    """Deploy `family`'s run with these serve fields (small replicas by default); returns the base URL."""
    spec, run_dir = runs[family]
    cfg = ServeSpec.model_validate({"route_prefix": f"/{family}", "num_cpus": 0.5, **serve_fields})
    return deploy(spec.model_copy(update={"serve": cfg}), run_dir, port=port).url


def validation_inputs(spec, n):
    """The first n raw validation instances, exactly as a client would send them (JSON-able)."""
    return raw_inputs(spec, "validation", n)


def offline_probabilities(run_dir, spec, instances, int8=False):
    model, info = load_servable(run_dir / "model")
    served = load_served_model(spec.model_copy(update={"serve": None}), run_dir)
    served.model = quantize_int8(model) if int8 else model
    return served.probabilities(instances)


def post(url, **kwargs):
    return requests.post(url, timeout=60, **kwargs)


@contextlib.contextmanager
def serve_mode_as_the_cli_picks_it(cfg):
    """Serve's ingress mode as `steward serve` picks it for the serve section `cfg` (HAProxy's high-throughput mode
    where a binary is at hand), for Rays started inside; the caller's setting comes back after. Yields whether the
    mode is on."""
    from steward.ray_env import HIGH_THROUGHPUT, prefer_high_throughput

    before = {k: os.environ.get(k) for k in HIGH_THROUGHPUT}
    try:
        yield prefer_high_throughput(cfg)
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
