"""Serving overhead, side by side in one run: steward on Ray Serve vs bare FastAPI, batching, int8.

    python benchmarks/serve_overhead.py [--seconds 3] [--requests 400] [--repeats 3]

1. Overhead: the quickstart CNN (cheap, so fixed per-request costs show most), one replica / one uvicorn process,
   one torch thread, batching off, the same /predict handler (benchmarks/bare_fastapi.py). p50 / p99 latency of
   sequential requests (concurrency 1) and the most requests/s at concurrency 32; for a fixed deployment and an
   autoscaled one (held at one replica: its forward passes run in a worker thread and it reports its load).
2. Batching: a 4-layer, 256-wide BERT on 64 tokens, one instance per request at concurrency 32, batching off vs
   on (max 16, 5 ms wait); the served gain against the model's own offline gain (batch-16 vs batch-1 forward).
3. int8 vs fp32: the same BERT offline at batch 16 and served with batching at concurrency 32.
Serve runs Ray's high-throughput mode (HAProxy, `RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1`)
when `haproxy` is installed, as `steward serve` does and `make setup` arranges. Cells alternate (A B A B) so the
machine's drift hits both alike; figures are medians over repeats, with the judged ones' min and max repeat by
repeat beside them.
Writes benchmarks/results/serve_overhead.json and prints the ratios.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.serving: the fast trained-run helper the serve tests use

import requests  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from steward.bench.load import generate  # noqa: E402
from steward.bench.machine import manifest  # noqa: E402
from steward.data import raw_inputs  # noqa: E402
from steward.ray_env import free_port  # noqa: E402
from steward.serve.model import load_served_model  # noqa: E402
from steward.serve.quantize import quantize_int8  # noqa: E402
from steward.serve.timing import parse_header  # noqa: E402
from steward.spec.bench import LoadSpec  # noqa: E402
from steward.spec.serve import ServeSpec  # noqa: E402

BERT = [
    "model.params.hidden_size=256",
    "model.params.num_layers=4",
    "model.params.num_heads=4",
    "model.params.intermediate_size=1024",
    "model.params.dropout=0",
    "data.max_length=64",
    "data.options.num_samples=1500",
    "data.tokenizer.vocab_size=2000",
]


AUTOSCALED = {"min_replicas": 1, "max_replicas": 1, "metrics_interval_s": 1.0, "look_back_period_s": 5.0}


def measure(url: str, bodies: list[dict], args: argparse.Namespace, latency: bool) -> dict:
    """Most requests/s at concurrency 32; with `latency`, p50 / p99 of sequential requests (steward bench's loader)."""
    out = {"qps_c32": qps(url, bodies, args.seconds)}
    if latency:
        [level] = generate(url, bodies, LoadSpec(concurrency=[1], seconds=120, max_requests=args.requests))
        out |= {"p50_ms": level["p50_ms"], "p99_ms": level["p99_ms"]}
    return out


def qps(url: str, bodies: list[dict], seconds: float) -> float:
    return generate(url, bodies, LoadSpec(concurrency=[32], seconds=seconds))[0]["qps"]


def bare_server(run_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "bare_fastapi.py"), str(run_dir), str(port)], env=env
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the bare FastAPI server did not start") from None
            time.sleep(0.2)


def serve_deploy(spec, run_dir: Path, port: int, prefix: str, **fields) -> str:
    from steward.serve.deploy import deploy

    cfg = ServeSpec.model_validate(
        {"route_prefix": prefix, "name": prefix.strip("/"), "num_replicas": 1, "num_cpus": 0.5, **fields}
    )
    return deploy(spec.model_copy(update={"serve": cfg, "monitor": None}), run_dir, port=port).url


def offline_models(spec, run_dir: Path) -> dict:
    """The served model in fp32 and int8, in this process, for the offline cells."""
    fp32 = load_served_model(spec.model_copy(update={"serve": None}), run_dir)
    int8 = load_served_model(spec.model_copy(update={"serve": None}), run_dir)
    int8.model = quantize_int8(fp32.model)
    return {"fp32": fp32, "int8": int8}


def offline(served, texts: list, seconds: float) -> float:
    """Instances/s of check + tokenize + forward on `texts` as one request, one torch thread, as a replica runs it."""
    served.probabilities(texts)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        served.probabilities(texts)
        count += len(texts)
    return count / (time.perf_counter() - start)


def overhead(cnn, args, port: int) -> dict:
    spec, run_dir = cnn
    bodies = [{"instances": [x]} for x in raw_inputs(spec, "validation", 64)]
    proc, bare_url = bare_server(run_dir)
    urls = {
        "bare FastAPI": bare_url,
        "steward on Serve": serve_deploy(spec, run_dir, port, "/cnn", batching=None),
        # the autoscaled replica's path (forward passes in a worker thread, load reports to the autoscaler), held
        # at one replica so that it is compared with one bare process
        "steward on Serve, autoscaled": serve_deploy(
            spec, run_dir, port, "/cnn-auto", batching=None, num_replicas=None, autoscaling=AUTOSCALED
        ),
    }
    cells: dict[str, list[dict]] = {cell: [] for cell in urls}
    try:
        for _ in range(args.repeats):
            for cell, url in urls.items():
                cells[cell].append(measure(f"{url}/predict", bodies, args, latency=True))
        where = {cell: breakdown(f"{url}/predict", bodies, args.requests // 2, 1) for cell, url in urls.items()}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    medians = {cell: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for cell, runs in cells.items()}
    return {cell: medians[cell] | {"each": runs, "breakdown_ms": where[cell]} for cell, runs in cells.items()}


def breakdown(url: str, bodies: list[dict], count: int, concurrency: int) -> dict[str, float]:
    """Median milliseconds of each phase the replica reports (Server-Timing) and of the whole request as the client
    waited for it, over `count` requests at `concurrency`; `outside` is the rest: proxy, network, Serve's own."""

    def one(i: int) -> dict[str, float]:
        reply = session.post(url, json=bodies[i % len(bodies)], timeout=60)
        reply.raise_for_status()
        return {"client": reply.elapsed.total_seconds() * 1000, **parse_header(reply.headers.get("Server-Timing", ""))}

    with requests.Session() as session, ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(one, range(count)))
    names = dict.fromkeys(name for row in rows for name in row)  # in the order the replica reports them
    medians = {name: statistics.median(row.get(name, 0.0) for row in rows) for name in names}
    inside = sum(ms for name, ms in medians.items() if name != "client")
    return medians | {"outside": medians["client"] - inside}


def breakdown_table(title: str, cells: dict[str, dict[str, float]], console: Console) -> None:
    """Where a request's time goes, cell by cell (medians of each phase; bare FastAPI reports none)."""
    names = list(dict.fromkeys(name for phases in cells.values() for name in phases))
    table = Table(title=title)
    for column in ("", *names):
        table.add_column(column, justify="right")
    for cell, phases in cells.items():
        table.add_row(cell, *(f"{phases[n]:.2f}" if n in phases else "" for n in names))
    console.print(table)


def batching_and_int8(bert, args, port: int) -> dict:
    spec, run_dir = bert
    bodies = [{"instances": [x]} for x in raw_inputs(spec, "validation", 64)]
    batching = {"max_batch_size": 16, "batch_wait_timeout_ms": 5}
    urls = {
        "fp32 batching off": serve_deploy(spec, run_dir, port, "/off", batching=None),
        "fp32 batching on": serve_deploy(spec, run_dir, port, "/on", batching=batching),
        "int8 batching on": serve_deploy(spec, run_dir, port, "/int8", batching=batching, quantize="int8"),
    }
    torch.set_num_threads(1)
    models, texts = offline_models(spec, run_dir), raw_inputs(spec, "validation", 16)
    served: dict[str, list[float]] = {cell: [] for cell in urls}
    alone: dict[str, list[float]] = {f"{kind} batch {b}": [] for kind in models for b in (1, 16)}
    for _ in range(args.repeats):  # served and offline cells interleaved: the machine's drift hits them alike
        for cell, url in urls.items():
            served[cell].append(qps(f"{url}/predict", bodies, args.seconds))
        for cell in alone:
            kind, batch = cell.split()[0], int(cell.split()[-1])
            alone[cell].append(offline(models[kind], texts[:batch], args.seconds))
    seen = {cell: _batch_sizes(url) for cell, url in urls.items() if "on" in cell.split()}
    return {
        "breakdown_ms_c32": {cell: breakdown(f"{url}/predict", bodies, 600, 32) for cell, url in urls.items()},
        "batch_sizes_seen": seen,
        "served_qps_c32": {c: statistics.median(v) for c, v in served.items()},
        "offline_per_s": {c: statistics.median(v) for c, v in alone.items()},
        "served_qps_c32_each": served,
        "offline_per_s_each": alone,
    }


def _batch_sizes(url: str) -> dict[str, int]:
    import requests

    return requests.get(f"{url}/info", timeout=30).json()["replica"]["batch_sizes"]


def overhead_table(result: dict, console: Console) -> None:
    over = result["overhead"]
    bare = over["bare FastAPI"]
    table = Table(title=f"Serving overhead, quickstart CNN, 1 replica x 1 thread (proxy: {result['proxy']})")
    for column in ("", "p50 ms (c=1)", "p99 ms (c=1)", "max QPS (c=32)"):
        table.add_column(column, justify="right")
    for cell, r in over.items():
        table.add_row(cell, f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['qps_c32']:.0f}")
    for cell, steward in over.items():
        if cell == "bare FastAPI":
            continue
        p50, p99 = steward["p50_ms"] - bare["p50_ms"], steward["p99_ms"] - bare["p99_ms"]
        qps = f"x{steward['qps_c32'] / bare['qps_c32']:.2f}"
        table.add_row(f"{cell} - bare", f"{p50:+.2f}", f"{p99:+.2f}", qps)
        pairs = list(zip(bare["each"], steward["each"], strict=True))  # repeat by repeat: the spread
        p50s = [s["p50_ms"] - b["p50_ms"] for b, s in pairs]
        p99s = [s["p99_ms"] - b["p99_ms"] for b, s in pairs]
        qpss = [s["qps_c32"] / b["qps_c32"] for b, s in pairs]
        table.add_row("  each repeat: min, max", _range(p50s, "+.2f"), _range(p99s, "+.2f"), _range(qpss, ".2f", "x"))
    console.print(table)


def _range(values: list[float], spec: str, prefix: str = "") -> str:
    return f"{prefix}{min(values):{spec}}, {prefix}{max(values):{spec}}"


def batching_table(result: dict, console: Console) -> None:
    qps, off = result["batching"]["served_qps_c32"], result["batching"]["offline_per_s"]
    table = Table(title="BERT 4x256, 64 tokens: batching and int8 (served: 1 instance per request, c=32)")
    for column in ("", "served", "offline", "served / offline", "each repeat, min, max: served; served / offline"):
        table.add_column(column, justify="right")
    for name, (s, o) in result["ratios"].items():
        each = result["ratios_each"][name]
        spread = f"{_range([a for a, _ in each], '.2f', 'x')}; {_range([a / b for a, b in each], '.2f')}"
        table.add_row(name, f"x{s:.2f}", f"x{o:.2f}", f"{s / o:.2f}", spread)
    for cell, value in qps.items():
        table.add_row(f"served QPS, {cell}", f"{value:.0f}", "", "")
    for cell, value in off.items():
        table.add_row(f"offline instances/s, {cell}", "", f"{value:.0f}", "")
    console.print(table)


def ratios(result: dict) -> dict[str, tuple[float, float]]:
    """Served and offline gains of batching and of int8, from the medians over repeats."""
    return gains(result["batching"]["served_qps_c32"], result["batching"]["offline_per_s"])


def ratios_each(result: dict) -> dict[str, list[tuple[float, float]]]:
    """The same gains repeat by repeat (a repeat's served and offline cells ran together): their spread."""
    served, alone = result["batching"]["served_qps_c32_each"], result["batching"]["offline_per_s_each"]
    repeats = len(next(iter(served.values())))
    each = [gains({c: v[i] for c, v in served.items()}, {c: v[i] for c, v in alone.items()}) for i in range(repeats)]
    return {name: [gain[name] for gain in each] for name in each[0]}


def gains(qps: dict[str, float], off: dict[str, float]) -> dict[str, tuple[float, float]]:
    return {
        "batching gain (on / off)": (
            qps["fp32 batching on"] / qps["fp32 batching off"],
            off["fp32 batch 16"] / off["fp32 batch 1"],
        ),
        "int8 / fp32 throughput": (
            qps["int8 batching on"] / qps["fp32 batching on"],
            off["int8 batch 16"] / off["fp32 batch 16"],
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="Measured seconds per throughput cell.")
    parser.add_argument("--requests", type=int, default=400, help="Sequential requests per latency cell.")
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved repeats per cell (medians reported).")
    parser.add_argument("--skip-overhead", action="store_true", help="Only the batching and int8 cells.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_overhead.json")
    args = parser.parse_args()
    console = Console()
    started = time.monotonic()
    from steward.ray_env import prefer_high_throughput

    # As `steward serve` does with an embedded Ray; set RAY_SERVE_ENABLE_HA_PROXY=0 to measure the default proxy.
    proxy = "haproxy (high-throughput mode)" if prefer_high_throughput(ServeSpec()) else "Serve's default proxy"
    import ray
    from ray import serve
    from tests.serving import trained_run

    tmp = Path(tempfile.mkdtemp(prefix="steward-serve-bench-"))
    console.print("training the CNN and the BERT (plain torch, a few epochs)")
    cnn = trained_run(tmp / "cnn", "quickstart.yaml", epochs=2)
    bert = trained_run(tmp / "bert", "text-transformer.yaml", *BERT, epochs=2, lr=1e-3)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        result: dict = {"proxy": proxy, "args": vars(args), "manifest": manifest(bert[0])}
        result["overhead"] = {} if args.skip_overhead else overhead(cnn, args, port)
        for name in list(serve.status().applications):
            serve.delete(name)
        result["batching"] = batching_and_int8(bert, args, port)
        result["ratios"] = ratios(result)
        result["ratios_each"] = ratios_each(result)
        result["benchmark_s"] = time.monotonic() - started
    finally:
        serve.shutdown()
        ray.shutdown()
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if result["overhead"]:
        overhead_table(result, console)
        where = {cell: r["breakdown_ms"] for cell, r in result["overhead"].items()}
        breakdown_table("Where a request's time goes, ms (medians at c=1; outside: proxy, network)", where, console)
    batching_table(result, console)
    breakdown_table("BERT at c=32, ms (medians)", result["batching"]["breakdown_ms_c32"], console)
    console.print(f"batch sizes seen (size: batches): {result['batching']['batch_sizes_seen']}")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
