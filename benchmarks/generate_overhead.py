"""Generation serving overhead, side by side in one run: steward's OpenAI-compatible endpoint vs offline generate().

    python benchmarks/generate_overhead.py [--tokens 128] [--rounds 3] [--ttft 30] [--repeats 3]

Two GPT-2 models trained from jobs/tiny-gpt.yaml in-process (a few seconds; the text quality does not matter): the
example's own size (2 x 64) and a 4-layer, 256-wide one, both with 256 positions. For each, on one torch thread:

1. tokens/s at 1 and 8 concurrent streams: served (POST /v1/completions, stream: true, greedy, the end-of-text token
   suppressed so that every stream makes exactly --tokens tokens) over Hugging Face's own `generate()` offline on
   the same prompts as one left-padded batch of 1 and of 8 (the same tokens). Target: >= 0.8.
2. time to first token, p50 of --ttft sequential requests: the first streamed token's arrival at the client vs
   offline `generate(max_new_tokens=1)` on one prompt. Target: <= 5 ms more.
3. monitoring's cost: the same tokens/s cells on a second deployment of the model, watched (monitor.drift with
   prompt embeddings, monitor.leaks: personal data and training n-grams; windows of 200), over the unwatched one.
   Target: >= 0.97.

Served and offline cells alternate, repeat after repeat; figures are medians over repeats with the min and max
beside them. Serve runs as `steward serve` runs it (HAProxy's high-throughput mode where haproxy is installed).
Writes benchmarks/results/generate_overhead.json and prints the table.
"""

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.serving: the fast trained-run helper the serve tests use

import requests  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from steward.bench.machine import manifest  # noqa: E402
from steward.ray_env import free_port, prefer_high_throughput  # noqa: E402
from steward.serve.deploy import deploy  # noqa: E402
from steward.serve.lm import open_language_model  # noqa: E402
from steward.serve.model import model_source  # noqa: E402
from steward.spec.monitor import MonitorSpec  # noqa: E402
from steward.spec.serve import ServeSpec  # noqa: E402

POSITIONS = 256
MODELS = {
    "gpt2 2x64 (tiny-gpt)": [],
    "gpt2 4x256": [
        "model.params.hidden_size=256",
        "model.params.num_layers=4",
        "model.params.num_heads=4",
        "model.params.intermediate_size=1024",
    ],
}
PROMPTS = [
    "the movie was",
    "yall lowkey great food and",
    "bad",
    "indeed the service was very",
    "love it",
    "we felt the staff",
    "a day",
    "they then",
]


def train(root: Path, extra: list[str]):
    from tests.serving import trained_run

    overrides = [
        "data.options.num_samples=300",
        f"model.params.config_overrides={{max_position_embeddings: {POSITIONS}}}",
    ]
    return trained_run(root, "tiny-gpt.yaml", *overrides, *extra, epochs=1)


def served_tokens_per_s(url: str, lm, streams: int, args) -> float:
    """Completion tokens/s of `streams` concurrent streams, --rounds times over."""
    banned = {str(token): -100 for token in lm.eos}

    def one(prompt: str) -> int:
        body = {
            "model": url.rsplit("/", 1)[-1],  # the application's name, which is its route prefix here
            "prompt": prompt,
            "max_tokens": args.tokens,
            "temperature": 0,
            "stream": True,
            "logit_bias": banned,
            "stream_options": {"include_usage": True},
        }
        with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=120) as reply:
            events = [line for line in reply.iter_lines() if line.startswith(b"data: {")]
        return json.loads(events[-1][6:])["usage"]["completion_tokens"]

    start, tokens = time.perf_counter(), 0
    with ThreadPoolExecutor(streams) as pool:
        for _ in range(args.rounds):
            tokens += sum(pool.map(one, PROMPTS[:streams]))
    return tokens / (time.perf_counter() - start)


def offline_tokens_per_s(lm, batch: int, args) -> float:
    """Tokens/s of Hugging Face generate() on the same prompts as one left-padded batch, --rounds times over."""
    ids, mask = left_padded(lm, PROMPTS[:batch])
    start = time.perf_counter()
    for _ in range(args.rounds):
        generate(lm, ids, mask, args.tokens)
    return batch * args.tokens * args.rounds / (time.perf_counter() - start)


def left_padded(lm, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [lm.encode(p) for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    return ids, mask


def generate(lm, ids: torch.Tensor, mask: torch.Tensor, tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return lm.hf.generate(
            ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
        )


def served_ttft_ms(url: str, count: int) -> float:
    """p50 time from sending a request to its first streamed token's event, over `count` sequential requests."""
    body = {"model": "bench", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "stream": True}
    times = []
    with requests.Session() as session:
        for _ in range(count):
            start = time.perf_counter()
            with session.post(f"{url}/v1/completions", json=body, stream=True, timeout=60) as reply:
                lines = reply.iter_lines()
                next(line for line in lines if line.startswith(b"data: {"))
                times.append(time.perf_counter() - start)
                for _line in lines:  # the rest of the stream, outside the timing
                    pass
    return 1000 * statistics.median(times)


def offline_ttft_ms(lm, count: int) -> float:
    ids, mask = left_padded(lm, PROMPTS[:1])
    times = []
    for _ in range(count):
        start = time.perf_counter()
        generate(lm, ids, mask, 1)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def serve_as(name: str, spec, run_dir: Path, port: int, args, monitor: MonitorSpec | None) -> str:
    """Deploy the run as application `name` (one replica; watched with `monitor`); returns its URL."""
    cfg = ServeSpec.model_validate(
        {
            "name": name,
            "route_prefix": f"/{name}",
            "num_replicas": 1,
            "num_cpus": 0.5,  # both applications' replicas fit on the two cores; a replica runs on one thread
            "generation": {"max_new_tokens": args.tokens, "max_prompt_tokens": 64},
        }
    )
    return deploy(spec.model_copy(update={"serve": cfg, "monitor": monitor}), run_dir, port=port).url


def measure(name: str, spec, run_dir: Path, port: int, args) -> dict:
    url = serve_as("bench", spec, run_dir, port, args, None)
    watching = MonitorSpec.model_validate({"drift": {}, "leaks": {}, "window": {"size": 200}})
    watched = serve_as("watched", spec, run_dir, port, args, watching)
    lm = open_language_model(model_source(spec, run_dir))
    cells: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # served and offline alternate: the machine's drift hits both alike
        for streams in (1, 8):
            cells.setdefault(f"served tokens/s x{streams}", []).append(served_tokens_per_s(url, lm, streams, args))
            cells.setdefault(f"offline tokens/s x{streams}", []).append(offline_tokens_per_s(lm, streams, args))
            rate = served_tokens_per_s(watched, lm, streams, args)
            cells.setdefault(f"watched tokens/s x{streams}", []).append(rate)
        cells.setdefault("served TTFT ms", []).append(served_ttft_ms(url, args.ttft))
        cells.setdefault("offline TTFT ms", []).append(offline_ttft_ms(lm, args.ttft))
    info = requests.get(f"{url}/info", timeout=30).json()["replica"]["counts"]
    judged = {
        f"tokens/s ratio x{n}": [
            s / o for s, o in zip(cells[f"served tokens/s x{n}"], cells[f"offline tokens/s x{n}"], strict=True)
        ]
        for n in (1, 8)
    }
    judged["TTFT ms more"] = [s - o for s, o in zip(cells["served TTFT ms"], cells["offline TTFT ms"], strict=True)]
    for n in (1, 8):
        pairs = zip(cells[f"watched tokens/s x{n}"], cells[f"served tokens/s x{n}"], strict=True)
        judged[f"watched / unwatched tokens/s x{n}"] = [w / s for w, s in pairs]
    monitor = requests.get(f"{watched}/monitor", timeout=30).json()
    figures = {cell: spread(values) for cell, values in {**cells, **judged}.items()}
    return {"model": name, "figures": figures, "replica_counts": info, "watched_records": monitor["records"]}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "each": values}


def table(results: list[dict], cpu: str, console: Console) -> None:
    out = Table(title=f"Generation: served (Ray Serve, OpenAI API) vs offline generate(), 1 torch thread; {cpu}")
    for column in ("model", "cell", "median", "min", "max"):
        out.add_column(column, justify="right")
    for result in results:
        for cell, f in result["figures"].items():
            out.add_row(result["model"], cell, f"{f['median']:.2f}", f"{f['min']:.2f}", f"{f['max']:.2f}")
    console.print(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens each stream generates")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of streams per tokens/s cell")
    parser.add_argument("--ttft", type=int, default=30, help="sequential requests per TTFT cell")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generate_overhead.json")
    args = parser.parse_args()
    import tempfile

    from ray import serve

    torch.set_num_threads(1)  # as the replica (serve.torch_threads: 1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: train(Path(tmp) / str(i), extra) for i, (name, extra) in enumerate(MODELS.items())}
        proxy = "haproxy" if prefer_high_throughput(ServeSpec(num_replicas=1)) else "default"
        port = free_port()
        for name, (spec, run_dir) in runs.items():
            results.append(measure(name, spec, run_dir, port, args))
            serve.delete("bench")
            serve.delete("watched")
        serve.shutdown()
    machine = manifest(runs[next(iter(runs))][0])
    report = {"machine": machine, "proxy": proxy, "settings": vars(args) | {"out": str(args.out)}, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    table(results, machine["cpu"], Console())


if __name__ == "__main__":
    main()
