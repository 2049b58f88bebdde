"""Monitoring overhead, side by side in one run: the maths, the per-record update, and serving with it on vs off.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/monitor_overhead.py [--repeats 4]
        [--sections mmd window replica serving] [--run-dir DIR]

The environment gives numpy the one BLAS thread the monitor actor runs with (`steward.monitor.actor.ACTOR_ENV`; Ray
gives its workers one OpenMP thread too), set before numpy loads: a limit set afterwards (threadpoolctl) does not
hold BLAS to one thread. `make bench` sets it; the JSON records what it was.

1. mmd: `steward.monitor.drift.mmd_test` at 1,000 points per side, d = 32, 100 permutations, against a naive numpy
   implementation (kernel blocks recomputed for every permutation) on the same data and the same permutations.
   Both must return the same statistic and p-value; runs alternate (fast, naive, fast, ...), median over repeats.
2. window: the cost of adding one record to a `WindowState`, for growing records (prediction + group; + 64 feature
   histograms; + a 32-d embedding reservoir; + a request id and its late label), and per record in batches of 64.
3. replica: per request of one instance, offline (no Ray), the CPU time monitoring adds in the replica and the
   actor: the quickstart CNN's forward pass without and with the embedding tap (alternating pass by pass), in
   passes of the sizes Serve formed at c=32 in the serving section (the tap costs once a pass, not once a
   request; without the serving section, passes of one request), queueing a request's outputs, counting a push's
   worth of queued requests into a `WindowState`, pickling the push (shown apart: the serving section counts it in
   the transport and the actor), and in the actor merging the pushed deltas into windows (max_pending predictions
   waiting for labels), saving its state, and judging each closed window (`checks.window_report`). `--run-dir`
   reuses a trained quickstart run (else the serving section's, else one is trained here).
4. serving: the quickstart CNN on Ray Serve with a monitor section (drift + bias) against the same run without
   one, and against a second unmonitored twin: p50 / p99 latency and QPS at concurrency 1 and 32, one instance
   (with a group attribute) per request. Each repeat deploys all three afresh and rotates short runs (off, twin,
   on; then on, twin, off; ...: ROUNDS per concurrency); a repeat's cost compares its pooled runs, and the cost is
   the mean over repeats with a 90% interval (t over repeats) and the median. The twin's "cost" (an A/A
   comparison) is the noise floor of the QPS comparison (benchmarks/README.md has its size). So the serving
   section also accounts
   monitoring's CPU per request at c=32 process by process (psutil): the monitor actor's, measured live; the
   replica's, offline (section 3); a push's transport through Ray (a busy replica's push: SHARES_A_PUSH window
   shares), measured apart; as a share of what serving
   alone costs the machine. On saturated cores that share is the first-order QPS cost, without the noise.
   With both sections, serving runs first: the replica section replays the batch sizes it saw.
Writes benchmarks/results/monitor_overhead.json and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.spatial.distance import pdist

from steward.monitor.bins import Bins
from steward.monitor.drift import mmd_test, quantile_edges
from steward.monitor.window_state import WindowState
from steward.ray_env import free_port
from steward.serve.monitoring import SHARES_A_PUSH

ROOT = Path(__file__).resolve().parent.parent
MMD_N, MMD_D, MMD_B = 1000, 32, 100


def naive_mmd_test(reference: Any, current: Any, n_permutations: int = 100, seed: int = 0) -> tuple[float, float]:
    """The textbook permutation test: for each permutation, split the pooled points and recompute the three
    kernel blocks. Same bandwidth, statistic, permutations and p-value convention as `mmd_test`."""
    x, y = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    x, y = (x[:, None] if x.ndim == 1 else x), (y[:, None] if y.ndim == 1 else y)
    pooled, n = np.concatenate([x, y]), len(x)
    d2 = pdist(pooled, "sqeuclidean")  # independent of steward's distance code
    s2 = float(np.median(d2)) if np.median(d2) > 0 else float(np.median(d2[d2 > 0])) if (d2 > 0).any() else 1.0

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return np.exp(-np.maximum(sq, 0) / (2 * s2))

    def stat(a: np.ndarray, b: np.ndarray) -> float:
        return float(kernel(a, a).mean() + kernel(b, b).mean() - 2 * kernel(a, b).mean())

    observed = stat(x, y)
    rng = np.random.default_rng(seed)
    k = 0
    for _ in range(n_permutations):
        perm = rng.permutation(len(pooled))
        k += stat(pooled[perm < n], pooled[perm >= n]) >= observed - 1e-12
    return observed, (1 + k) / (1 + n_permutations)


def bench_mmd(repeats: int, console: Console) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(MMD_N, MMD_D))
    y = rng.normal(size=(MMD_N, MMD_D)) + 0.01  # a slight shift: p lands mid-range, so p agreement means something
    for fn in (mmd_test, naive_mmd_test):  # warm up BLAS threads and caches before timing
        fn(x[:100], y[:100], 5, 0)
    times: dict[str, list[float]] = {"fast": [], "naive": []}
    results = {}
    for r in range(repeats):
        for name, fn in (("fast", mmd_test), ("naive", naive_mmd_test)):
            t0 = time.perf_counter()
            results[name] = fn(x, y, MMD_B, 0)
            times[name].append(time.perf_counter() - t0)
        console.print(f"mmd repeat {r + 1}/{repeats}: fast {times['fast'][-1]:.3f} s, naive {times['naive'][-1]:.3f} s")
    (fs, fp), (ns, nap) = results["fast"], results["naive"]
    if abs(fs - ns) > 1e-9 * abs(ns) or fp != nap:
        raise RuntimeError(f"fast and naive MMD disagree: {results}")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "n_per_side": MMD_N,
        "dim": MMD_D,
        "permutations": MMD_B,
        "statistic": fs,
        "p_value": fp,
        "fast_s": med["fast"],
        "naive_s": med["naive"],
        "fast_min_s": min(times["fast"]),
        "naive_min_s": min(times["naive"]),
        "speedup": med["naive"] / med["fast"],
        "target_s": 0.5,
        "all_s": times,
    }


def _window_cases() -> dict[str, Callable[[WindowState, int], None]]:
    rng = np.random.default_rng(0)
    feats, emb = rng.normal(size=(4096, 64)), rng.normal(size=(4096, 32)).astype(np.float32)
    return {
        "prediction + group": lambda s, i: s.add(i % 10, group=i % 3, t=1.0),
        "+ 64 feature histograms": lambda s, i: s.add(i % 10, group=i % 3, features=feats[i % 4096], t=1.0),
        "+ 32-d embedding reservoir": lambda s, i: s.add(
            i % 10, group=i % 3, features=feats[i % 4096], samples={"embedding": emb[i % 4096]}, t=1.0
        ),
        "+ request id and late label": lambda s, i: (
            s.add(
                i % 10, group=i % 3, features=feats[i % 4096], samples={"embedding": emb[i % 4096]}, request_id=i, t=1.0
            ),
            s.add_feedback(i, i % 10),
        ),
    }


def bench_window(repeats: int, console: Console, records: int = 20_000) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(5000, 64))
    bins = Bins({f"x{i}": quantile_edges(ref[:, i]) for i in range(64)})
    feats, preds = rng.normal(size=(64, 64)), rng.integers(0, 10, 64)

    def batched(state: WindowState, _: int) -> None:  # one call per 64 records; cost divided below
        state.add_batch(preds, preds % 3, feats, t=1.0)

    cases = {**_window_cases(), "add_batch of 64 (prediction, group, 64 features)": batched}
    per: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved, so load from other processes hits every case alike
        for name, add in cases.items():
            calls = records // 64 if add is batched else records
            state = WindowState(bins, reservoir_capacity=1000)
            t0 = time.perf_counter()
            for i in range(calls):
                add(state, i)
            per[name].append((time.perf_counter() - t0) / (calls * (64 if add is batched else 1)) * 1e6)
    out = {name: {"us_per_record": statistics.median(v), "min_us": min(v), "all_us": v} for name, v in per.items()}
    for name, row in out.items():
        console.print(f"window {name}: {row['us_per_record']:.2f} us/record (min {row['min_us']:.2f})")
    return out


def _quickstart_run(run_dir: Path | None) -> tuple[Any, Path]:
    """(spec, run folder) of a trained quickstart run with a monitor section (drift + bias): `run_dir`'s, or one
    trained here in seconds as the serving tests do."""
    sys.path.insert(0, str(ROOT))
    from tests.serving import trained_run

    from steward.spec import load_job
    from steward.spec.monitor import MonitorSpec

    if run_dir is None:
        folder = Path(tempfile.mkdtemp(prefix="steward-monitor-bench-"))
        spec, run_dir = trained_run(folder, "quickstart.yaml", epochs=2)
    else:
        spec = load_job(run_dir / "spec.yaml")
    bias = {"group": "group", "favourable": "0", "privileged": "a"}
    monitor = MonitorSpec.model_validate({"drift": {}, "bias": bias})
    return spec.model_copy(update={"monitor": monitor}), run_dir


def _cpu_us(fn: Callable[[], Any], calls: int, per: int = 1) -> float:
    """CPU microseconds (this process, all threads) per unit of work: `calls` calls of `fn`, each doing `per` units."""
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / (calls * per) * 1e6


class Push:
    """A lone replica's push under load: a count window of one-instance requests of the quickstart (a group
    attribute and a request id each), queued and counted as a monitored replica does."""

    def __init__(self, spec: Any, run_dir: Path) -> None:
        from steward.monitor.reference import reference_for
        from steward.serve.model import load_served_model

        sys.path.insert(0, str(ROOT))
        from tests.serving import validation_inputs

        self.served, ref = load_served_model(spec, run_dir), reference_for(run_dir)
        assert ref is not None and spec.monitor is not None
        self.ref, self.bins, self.monitor = ref, ref.bins(), spec.monitor
        window = spec.monitor.window
        self.size = int(window.step or window.size)  # a lone replica under load pushes once a count window
        self.prepared = [self.served.prepare([x]) for x in validation_inputs(spec, 64)]
        self.outputs = [self.served.run([self.prepared[i % 64]], True)[0] for i in range(self.size)]
        self.attributes = [{"group": ["ab"[i % 2]]} for i in range(self.size)]
        self.ids = [[f"{i:032x}"] for i in range(self.size)]

    def queue(self) -> Any:
        from steward.serve.monitoring import RecordQueue

        queue = RecordQueue(self.served, self.bins, self.monitor.bias)
        for output, attributes, ids in zip(self.outputs, self.attributes, self.ids, strict=True):
            queue.append(output, attributes, ids)
        return queue

    def count(self) -> WindowState:
        from steward.monitor.checks import live_state

        state = live_state(self.bins)
        self.queue().count_into(state)
        return state


def bench_replica(
    repeats: int,
    console: Console,
    run_dir: Path | None = None,
    batch_sizes: dict[str, int] | None = None,
    requests: int = 4000,
) -> dict[str, Any]:
    """`batch_sizes`: forward passes per batch size (requests a pass) as Serve formed them; default all single."""
    import torch

    from steward.monitor.checks import live_state, window_report
    from steward.monitor.windowing import Windows
    from steward.serve.model import load_served_model

    spec, run_dir = _quickstart_run(run_dir)
    torch.set_num_threads(1)  # as a replica runs it (serve.torch_threads)
    # two copies of the model: a monitored replica's (embeds every request) and an unmonitored one's
    push, plain = Push(spec, run_dir), load_served_model(spec, run_dir)
    served, prepared, ref, bins, cfg = push.served, push.prepared, push.ref, push.bins, spec.monitor
    deltas = [push.count() for _ in range(requests // push.size)]

    def merge_all() -> Windows:
        """The deltas merged into windows as the actor does, in its steady state without late labels: the open pane
        holds max_pending predictions still waiting for a label."""
        windows = Windows(lambda: live_state(bins), cfg.window.size, cfg.window.step, cfg.window.by)
        windows.pane.pending_predictions = {f"old{i}": ("a", "0") for i in range(windows.pane.max_pending)}
        t0 = time.process_time()
        for delta in deltas:
            windows.add_state(delta, t=1.0)
        merged.append(time.process_time() - t0)
        return windows

    def save_state() -> float:
        """The actor's periodic saves (`Monitor._snapshot`) in the steady state of merge_all, as CPU us per request
        at 1,500 requests/s: the statistics every persist_interval_s (5 s), the waiting predictions every
        pending_persist_interval_s (60 s)."""
        windows = merge_all()
        t0 = time.process_time()
        json.dumps({"windows": windows.to_dict(pending=False)})
        t1 = time.process_time()
        json.dumps(windows.pane.pending_to_dict())
        t2 = time.process_time()
        return ((t1 - t0) / cfg.persist_interval_s + (t2 - t1) / cfg.pending_persist_interval_s) * 1e6 / 1500

    merged: list[float] = []
    closed: list[WindowState] = []
    windows = Windows(lambda: live_state(bins), cfg.window.size, cfg.window.step, cfg.window.by)
    for delta in deltas:
        closed += windows.add_state(delta, t=1.0)
    records_judged = int(cfg.window.size) * len(closed)

    def judge() -> list[dict]:
        return [window_report(w, ref, cfg, i) for i, w in enumerate(closed)]

    forward: dict[str, list[float]] = {"off": [], "on": []}
    passes = _replayed_passes(batch_sizes or {"1": 1}, requests)

    def forward_pairs() -> float:
        """Unmonitored and monitored forward passes alternating pass by pass, each side's CPU summed per request:
        the difference is small beside a pass's cost, and load from other processes changes faster than a block of
        passes would last."""
        spent = {"off": 0.0, "on": 0.0}
        calls = {"off": lambda xs: plain.run(xs, False), "on": lambda xs: served.run(xs, True)}
        for i, size in enumerate(passes):
            batch = [prepared[(i + j) % 64] for j in range(size)]
            for side in ("off", "on") if i % 2 else ("on", "off"):  # the second of a pair runs on warmer caches
                t0 = time.process_time()
                calls[side](batch)
                spent[side] += time.process_time() - t0
        for side, total in spent.items():
            forward[side].append(total / sum(passes) * 1e6)
        return forward["off"][-1]

    cases: dict[str, Callable[[], float]] = {
        "forward, unmonitored model": forward_pairs,
        "forward, monitored (embed)": lambda: forward["on"][-1],
        "queue (record)": lambda: _cpu_us(push.queue, requests // push.size, push.size),
        "queue + count (push)": lambda: _cpu_us(push.count, requests // push.size, push.size),
        "push: pickle + unpickle the delta": lambda: _cpu_us(
            lambda: pickle.loads(pickle.dumps(deltas[0])), 50, push.size
        ),
        "actor: merge deltas": lambda: (merge_all(), merged[-1] / requests * 1e6)[1],
        "actor: save the state (at 1,500/s)": save_state,
        "actor: judge windows": lambda: _cpu_us(judge, 1, records_judged),
    }
    for fn in cases.values():  # warm up torch, numpy and the caches before timing
        fn()
    per: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeats):  # interleaved, so load from other processes hits every case alike
        for name, fn in cases.items():
            per[name].append(fn())
        console.print(f"replica repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in per.items()))
    out: dict[str, Any] = {
        name: {"us_per_request": statistics.median(v), "min_us": min(v), "all_us": v} for name, v in per.items()
    }
    embed = [a - b for a, b in zip(forward["on"][-repeats:], forward["off"][-repeats:], strict=True)]
    out["embed (monitored - unmonitored)"] = {"us_per_request": statistics.median(embed), "min_us": min(embed)}
    replica = [e + c for e, c in zip(embed, per["queue + count (push)"], strict=True)]
    out["replica total"] = {"us_per_request": statistics.median(replica), "min_us": min(replica), "target_us": 15.0}
    actor = [
        m + j + v
        for m, j, v in zip(
            per["actor: merge deltas"],
            per["actor: judge windows"],
            per["actor: save the state (at 1,500/s)"],
            strict=True,
        )
    ]
    out["actor total"] = {"us_per_request": statistics.median(actor), "min_us": min(actor)}
    # Ray sends a call's arguments inline up to 100 KB; a larger push goes through the object store
    out["push_bytes"], out["run_dir"] = len(pickle.dumps(deltas[0])), str(run_dir)
    out["requests_per_pass"] = sum(passes) / len(passes)
    return out


def _replayed_passes(batch_sizes: dict[str, int], requests: int) -> list[int]:
    """Forward-pass sizes in the proportions of `batch_sizes` (passes per size), about `requests` requests in all,
    shuffled so that no size meets only one phase of the machine's load."""
    scale = requests / (_per_pass(batch_sizes) * sum(batch_sizes.values()))
    passes = [int(size) for size, count in batch_sizes.items() for _ in range(max(1, round(count * scale)))]
    np.random.default_rng(0).shuffle(passes)
    return passes


# Rounds of off/twin/on runs per repeat, by concurrency: the machine's speed swings from one run to the next, and a
# round costs little beside a repeat's fresh deployments. c=32 carries the judged CPU share; c=1, latency only.
ROUNDS = {1: 1, 32: 2}
# Cells of the serving section. The twin is a second unmonitored deployment measured exactly like the first: its
# "cost" (an A/A comparison) shows how much of a measured QPS difference this machine's noise alone produces.
CELLS = {"off": "monitoring off", "twin": "monitoring off (A/A twin)", "on": "monitoring on"}


def bench_serving(repeats: int, console: Console, seconds: float = 2.5) -> dict[str, Any]:
    import ray
    import requests
    from ray import serve

    sys.path.insert(0, str(ROOT))
    from tests.serving import trained_run, validation_inputs

    from steward.bench.load import generate
    from steward.bench.machine import manifest
    from steward.ray_env import prefer_high_throughput
    from steward.serve.deploy import deploy
    from steward.spec.bench import LoadSpec
    from steward.spec.serve import ServeSpec

    spec, run_dir = trained_run(Path(tempfile.mkdtemp(prefix="steward-monitor-bench-")), "quickstart.yaml", epochs=2)
    push = Push(*_quickstart_run(run_dir))
    monitor = push.monitor
    # a busy replica's push: SHARES_A_PUSH shares, each with request ids of its own (pickle shares repeated objects)
    shares = []
    for k in range(SHARES_A_PUSH):
        push.ids = [[f"{k:08x}{i:024x}"] for i in range(push.size)]
        shares.append((k + 1, push.count()))
    bodies = [
        {"instances": [x], "attributes": {"group": ["ab"[i % 2]]}} for i, x in enumerate(validation_inputs(spec, 64))
    ]
    # the proxy `steward serve` picks for fixed replicas (HAProxy when installed): the smallest per-request base
    proxy = "haproxy" if prefer_high_throughput(ServeSpec(num_replicas=1)) else "default"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": (port := free_port())})
    runs: dict[str, list[list[dict]]] = {f"{cell}, c={c}": [] for cell in CELLS.values() for c in (1, 32)}
    pushes: list[float] = []  # the monitor's pushes per record at c=32, each repeat
    deltas_per_push: list[float] = []  # window shares a push carried at c=32, each repeat
    batches: dict[str, int] = {}  # the monitored replica's forward passes per batch size at c=32, all repeats
    repeat_s: list[float] = []  # each repeat's wall time, deployments and their deletion included
    try:
        transport = _push_transport_us(shares)
        for r in range(repeats):
            started = time.monotonic()
            # Fresh replicas every repeat: a replica process keeps its own speed all its life, so only new processes
            # average it out.
            urls = {}
            for app, cell in CELLS.items():
                cfg = ServeSpec(route_prefix=f"/{app}", name=app, num_replicas=1, num_cpus=0.5)
                watch = monitor if app == "on" else None
                urls[cell] = deploy(spec.model_copy(update={"serve": cfg, "monitor": watch}), run_dir, port=port).url
            requests.get(f"{urls[CELLS['on']]}/monitor", timeout=30).raise_for_status()  # the actor is up
            seen = _steady_state(push, run_dir, urls[CELLS["on"]])
            procs = {app: _process(f"ray::ServeReplica:{app}:") for app in CELLS} | {"actor": _process("ray::Monitor")}
            for key in runs:
                runs[key].append([])
            for c, rounds in ROUNDS.items():
                before_c, sizes = seen, _batch_sizes(urls[CELLS["on"]])
                for k in range(rounds):
                    # forward, then backward: whatever the later runs of a round meet falls on off and on alike
                    for cell, url in list(urls.items())[:: 1 if (r + k) % 2 else -1]:
                        before = _cpu_seconds(procs)
                        run = generate(f"{url}/predict", bodies, LoadSpec(concurrency=[c], seconds=seconds))[0]
                        after = _cpu_seconds(procs)
                        if cell == CELLS["on"]:
                            after["actor"] += _drained(url, procs["actor"], after["actor"])
                        run["cpu_us"] = {role: (after[role] - before[role]) / run["requests"] * 1e6 for role in after}
                        runs[f"{cell}, c={c}"][r].append(run)
                seen = requests.get(f"{urls[CELLS['on']]}/monitor", timeout=30).json()
            pushes.append((seen["pushes"] - before_c["pushes"]) / (seen["records"] - before_c["records"]))
            deltas_per_push.append((seen["deltas"] - before_c["deltas"]) / max(seen["pushes"] - before_c["pushes"], 1))
            for size, count in _batch_sizes(urls[CELLS["on"]]).items():
                batches[size] = batches.get(size, 0) + count - sizes.get(size, 0)
            for app in CELLS:  # deleted apps drain slowly: all at once, then wait for the last
                serve.delete(app, _blocking=False)
            while set(serve.status().applications) & set(CELLS):
                time.sleep(0.5)
            repeat_s.append(time.monotonic() - started)
            console.print(f"serving repeat {r + 1}/{repeats} done in {repeat_s[-1]:.0f} s")
    finally:
        serve.shutdown()
        ray.shutdown()
    out: dict[str, Any] = {
        cell: {k: statistics.median(run[k] for rep in reps for run in rep) for k in ("qps", "p50_ms", "p99_ms")}
        for cell, reps in runs.items()
    }
    out |= {"records_monitored": seen["records"], "proxy": proxy, "rounds_per_repeat": ROUNDS, "run_dir": str(run_dir)}
    out["manifest"] = manifest(spec)
    out |= {
        "push_transport_us": transport,
        "push_bytes": len(pickle.dumps(shares)),
        "pushes_per_record": pushes,
        "deltas_per_push": deltas_per_push,
        "batch_sizes c=32": batches,
        "repeat_s": repeat_s,
    }
    for c in (1, 32):
        off, twin, on = (runs[f"{cell}, c={c}"] for cell in CELLS.values())
        out[f"cost c={c}"] = _costs(off, on)
        out[f"a/a c={c}"] = _costs(off, twin)
    out["cpu c=32"] = _cpu_costs(runs["monitoring off, c=32"], runs["monitoring on, c=32"])
    return out


def _steady_state(push: Push, run_dir: Path, url: str) -> dict[str, Any]:
    """Bring the "on" app's monitor to the steady state of a deployment that has served more than max_pending
    records and got no labels: max_pending predictions wait for one, and their saves (pending.json) cost the actor
    CPU. A fresh monitor holds only this run's records, a fraction of that. Returns the monitor's report once the
    filler is no longer counted as a replica pushing (three push intervals)."""
    import ray
    import requests

    from steward.monitor.actor import NAMESPACE, actor_name

    filler = WindowState(push.bins)
    filler.pending_predictions = {f"steady{i:026d}": ("a", "0") for i in range(filler.max_pending)}
    monitor = ray.get_actor(actor_name("on", run_dir), namespace=NAMESPACE)
    ray.get(monitor.push.remote([(1, filler)], "steady-state filler", 1, 1))
    time.sleep(3 * push.monitor.push_interval_s)
    return requests.get(f"{url}/monitor", timeout=30).json()


def _drained(url: str, actor: Any, since: float) -> float:
    """The monitor actor's CPU seconds, from `since`, for what a run left in its replica (else the next run's
    measurement would get it, or none): GET /monitor pushes the replica's last records and waits for the windows
    they close to be judged; a second GET, with nothing left to push, is the report alone, not serving's cost."""
    import requests

    spent = []
    for _ in range(2):
        requests.get(f"{url}/monitor", timeout=30).raise_for_status()
        now = sum(actor.cpu_times()[:2])
        spent.append(now - since)
        since = now
    return max(spent[0] - spent[1], 0.0)


def _batch_sizes(url: str) -> dict[str, int]:
    """The replica's forward passes so far, per requests a pass (its /info)."""
    import requests

    return requests.get(f"{url}/info", timeout=30).json()["replica"]["batch_sizes"]


def _process(title: str, timeout: float = 60.0) -> Any:
    """The process whose command line (Ray sets it to the actor's class) starts with `title`."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in psutil.process_iter(["cmdline"]):
            if " ".join(proc.info["cmdline"] or []).startswith(title):
                return proc
        time.sleep(0.5)
    raise RuntimeError(f"no process {title!r} after {timeout:.0f} s")


def _cpu_seconds(procs: dict[str, Any]) -> dict[str, float]:
    """CPU seconds so far: the machine's busy time (steal excluded), this process's (the load generator), and each
    of `procs`' (the three apps' replicas, the monitor actor)."""
    import psutil

    busy = psutil.cpu_times()
    spent = {name: sum(proc.cpu_times()[:2]) for name, proc in procs.items()}
    return spent | {
        "machine": busy.user + busy.nice + busy.system + busy.irq + busy.softirq,
        "client": sum(psutil.Process().cpu_times()[:2]),
    }


def _push_transport_us(deltas: list[tuple[int, WindowState]], pushes: int = 300) -> dict[str, float]:
    """CPU us a push of `deltas` costs Ray's transport: in the pushing process (a replica) and in Ray's daemons
    (the raylet's object store, for a push over Ray's 100 KB limit for arguments sent inline); the receiving
    actor's side is in the monitor actor's measured CPU. Each side's idle CPU over as long a quiet spell (Ray's
    threads in this process too) is subtracted."""
    import psutil
    import ray

    @ray.remote(num_cpus=0)
    class Sink:
        def push(self, deltas: Any, replica: str, kept_from: int, latest: int) -> int:
            return os.getpid()

    sink = Sink.remote()  # type: ignore[attr-defined]
    skip = {os.getpid(), ray.get(sink.push.remote(deltas, "replica", 1, 1))}

    def daemons() -> float:
        total = 0.0
        for proc in psutil.process_iter():
            if proc.pid not in skip:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += sum(proc.cpu_times()[:2])
        return total

    d0, c0, t0 = daemons(), time.process_time(), time.perf_counter()
    time.sleep(2.0)
    d1, c1, t1 = daemons(), time.process_time(), time.perf_counter()
    for _ in range(pushes):
        ray.get(sink.push.remote(deltas, "replica", 1, 1))
    d2, c2, t2 = daemons(), time.process_time(), time.perf_counter()
    ray.kill(sink)

    def per_push(busy: float, quiet: float) -> float:  # CPU over the pushes less the quiet rate over as long
        return max(busy - quiet * (t2 - t1) / (t1 - t0), 0.0) / pushes * 1e6

    return {"pusher": per_push(c2 - c1, c1 - c0), "daemons": per_push(d2 - d1, d1 - d0)}


def _costs(off: list[list[dict]], on: list[list[dict]]) -> dict[str, Any]:
    """Each repeat's cost of monitoring (its runs pooled: all ran in turn on the same fresh replicas), then their
    mean with a 90% interval (t over repeats, the independent unit), and their median."""

    def pooled(rep: list[dict]) -> dict[str, float]:
        return {k: statistics.median(run[k] for run in rep) for k in ("p50_ms", "p99_ms")} | {
            "qps": sum(run["requests"] for run in rep) / sum(run["requests"] / run["qps"] for run in rep)
        }

    each = []
    for off_rep, on_rep in zip(off, on, strict=True):
        a, b = pooled(off_rep), pooled(on_rep)
        each.append(
            {"p50": b["p50_ms"] / a["p50_ms"] - 1, "p99": b["p99_ms"] / a["p99_ms"] - 1, "qps": 1 - b["qps"] / a["qps"]}
        )
    out: dict[str, Any] = {k: statistics.mean(e[k] for e in each) for k in each[0]}
    qps = _mean_ci([e["qps"] for e in each])
    return out | {"qps_ci90": qps["ci90"], "qps_median": qps["median"], "qps_each": qps["each"]}


def _mean_ci(values: list[float]) -> dict[str, Any]:
    """Mean with a t-based 90% interval over repeats (the independent unit), the median, and the values."""
    from scipy import stats

    mean = statistics.mean(values)
    n = len(values)
    half = stats.t.ppf(0.95, n - 1) * statistics.stdev(values) / n**0.5 if n > 1 else math.inf
    return {"mean": mean, "ci90": [mean - half, mean + half], "median": statistics.median(values), "each": values}


def _cpu_costs(off: list[list[dict]], on: list[list[dict]]) -> dict[str, Any]:
    """Each repeat's CPU per request, its runs pooled: what serving alone spends with monitoring off (the machine's
    busy time less the load generator's and the idle processes': the twin's and the monitored app's replicas and
    the monitor actor), and the monitor actor's while on (and while off: Ray's cost of an idle actor)."""

    def pooled(rep: list[dict], role: str) -> float:
        return sum(run["cpu_us"][role] * run["requests"] for run in rep) / sum(run["requests"] for run in rep)

    each: dict[str, list[float]] = {"serving_us": [], "actor_us": [], "idle_actor_us": []}
    for off_rep, on_rep in zip(off, on, strict=True):
        idle = sum(pooled(off_rep, role) for role in ("client", "twin", "on", "actor"))
        each["serving_us"].append(pooled(off_rep, "machine") - idle)
        each["actor_us"].append(pooled(on_rep, "actor"))
        each["idle_actor_us"].append(pooled(off_rep, "actor"))
        # where a run's CPU went, off and on: the whole machine, the load generator, the replica serving the run
        for side, rep in (("off", off_rep), ("on", on_rep)):
            for key, role in (("machine", "machine"), ("client", "client"), ("replica", side)):
                each.setdefault(f"{key}_{side}_us", []).append(pooled(rep, role))
            requests_per_s = sum(run["requests"] for run in rep) / sum(run["requests"] / run["qps"] for run in rep)
            each.setdefault(f"busy_cores_{side}", []).append(pooled(rep, "machine") * requests_per_s / 1e6)
    return {key: _mean_ci(values) for key, values in each.items()}


def accounted_cost(serving: dict[str, Any], replica: dict[str, Any]) -> dict[str, Any]:
    """Monitoring's CPU per request at c=32, each repeat, as a share of serving's: the monitor actor's (measured
    live), the replica's embed, queue and count (offline), and the pushes' transport (in the replica, pickling
    included, and Ray's daemons) times the pushes a record; the unpickling is in the actor's. On saturated cores
    this is the first-order QPS cost; it is measured per process, so the machine's run-to-run speed swings, which
    make the direct QPS comparison noisy (see the A/A twin), do not enter it."""
    cpu, push = serving["cpu c=32"], serving["push_transport_us"]
    in_replica = replica["replica total"]["us_per_request"]
    parts = {
        "actor": cpu["actor_us"]["each"],
        "replica": [in_replica] * len(serving["pushes_per_record"]),
        "transport": [(push["pusher"] + push["daemons"]) * n for n in serving["pushes_per_record"]],
    }
    totals = [sum(values) for values in zip(*parts.values(), strict=True)]
    shares = [t / s for t, s in zip(totals, cpu["serving_us"]["each"], strict=True)]
    return {f"{k}_us": _mean_ci(v) for k, v in parts.items()} | {
        "monitor_us": _mean_ci(totals),
        "share": _mean_ci(shares),
    }


def serving_table(res: dict[str, Any], console: Console) -> None:
    table = Table(title="Serving with monitoring on vs off: quickstart CNN, 1 replica, 1 instance per request")
    for col in ("cell", "p50 ms", "p99 ms", "QPS"):
        table.add_column(col, justify="right")
    for c in (1, 32):
        for cell in CELLS.values():
            row = res[f"{cell}, c={c}"]
            table.add_row(f"{cell}, c={c}", f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}", f"{row['qps']:.0f}")
        for key, label in (("cost", "cost of monitoring (target <= 3%)"), ("a/a", "off vs its twin (noise)")):
            cost = res[f"{key} c={c}"]
            low, high = cost["qps_ci90"]
            table.add_row(
                f"{label}, c={c}",
                f"{cost['p50']:+.1%}",
                f"{cost['p99']:+.1%}",
                f"{cost['qps']:+.1%} [{low:+.1%}, {high:+.1%}]",
            )
    table.caption = (
        f"costs: mean over repeats [90% interval]; records counted by the monitor: {res['records_monitored']}; proxy:"
        f" {res['proxy']}; batching on (the default: up to 16 requests, 5 ms wait), so the c=1 latency includes the"
        f" batch wait; {_per_pass(res['batch_sizes c=32']):.1f} requests a forward pass at c=32"
    )
    console.print(table)
    cpu = res["cpu c=32"]
    table = Table(title="CPU per request at c=32, us: mean over repeats [90% interval]")
    table.add_column("part")
    table.add_column("us / request", justify="right")
    rows = {
        "serving, monitoring off (machine less load generator and idle processes)": cpu["serving_us"],
        "monitor actor idle, during off runs (Ray's cost of any idle actor)": cpu["idle_actor_us"],
        "the serving replica live, off runs": cpu["replica_off_us"],
        "the serving replica live, on runs (a different process: its own speed)": cpu["replica_on_us"],
    }
    if acc := res.get("accounted c=32"):
        rows |= {
            "monitoring: the monitor actor, during on runs": acc["actor_us"],
            "monitoring: in the replica (embed, queue, count; offline)": acc["replica_us"],
            "monitoring: push transport (replica, pickling included, + Ray's daemons)": acc["transport_us"],
            "monitoring in all": acc["monitor_us"],
        }
        share = acc["share"]
        table.caption = (
            f"monitoring's share of serving's CPU: {share['mean']:.2%} [{share['ci90'][0]:.2%}, "
            f"{share['ci90'][1]:.2%}] (target <= 3%); cores busy: off runs "
            f"{cpu['busy_cores_off']['mean']:.2f}, on {cpu['busy_cores_on']['mean']:.2f}"
        )
    for name, part in rows.items():
        table.add_row(name, f"{part['mean']:.1f} [{part['ci90'][0]:.1f}, {part['ci90'][1]:.1f}]")
    console.print(table)


def _per_pass(batch_sizes: dict[str, int]) -> float:
    return sum(int(size) * n for size, n in batch_sizes.items()) / max(sum(batch_sizes.values()), 1)


def mmd_table(res: dict[str, Any], console: Console) -> None:
    table = Table(title=f"mmd_test, {res['n_per_side']}/side, d={res['dim']}, {res['permutations']} permutations")
    for col in ("implementation", "median s", "vs target 0.5 s", "statistic", "p"):
        table.add_column(col, justify="right")
    table.add_row(
        "steward (pooled kernel once)",
        f"{res['fast_s']:.3f}",
        f"{res['fast_s'] / 0.5:.2f}x",
        f"{res['statistic']:.3e}",
        f"{res['p_value']:.4f}",
    )
    table.add_row(
        "naive (kernels per permutation)",
        f"{res['naive_s']:.3f}",
        f"{res['naive_s'] / 0.5:.2f}x",
        f"{res['statistic']:.3e}",
        f"{res['p_value']:.4f}",
    )
    table.caption = (
        f"speed-up naive/steward (medians): {res['speedup']:.1f}x; "
        f"min s: steward {res['fast_min_s']:.3f}, naive {res['naive_min_s']:.3f}"
    )
    console.print(table)


def replica_table(res: dict[str, Any], console: Console) -> None:
    rows = {name: row for name, row in res.items() if isinstance(row, dict)}
    caption = (
        f"replica total = embed + queue + count (target <= 15 us); actor total = merge + judge + save, on the "
        f"same cores; one share's delta pickles to {res['push_bytes'] / 1000:.0f} KB"
    )
    title = (
        f"Monitoring CPU per request of one instance, offline: quickstart CNN, 1 torch thread, "
        f"{res['requests_per_pass']:.1f} requests a forward pass"
    )
    console.print(_cost_table(title, "step", "us_per_request", rows, caption))


def window_table(res: dict[str, Any], console: Console) -> None:
    console.print(_cost_table("WindowState update cost (median over repeats)", "record holds", "us_per_record", res))


def _cost_table(title: str, label: str, key: str, rows: dict[str, dict], caption: str | None = None) -> Table:
    """Median and min microseconds per row; `key` (us_per_request / us_per_record) holds the median."""
    table = Table(title=title, caption=caption)
    table.add_column(label)
    table.add_column(f"median us / {key.rsplit('_', 1)[1]}", justify="right")
    table.add_column("min", justify="right")
    for name, row in rows.items():
        table.add_row(name, f"{row[key]:.2f}", f"{row['min_us']:.2f}" if "min_us" in row else "")
    return table


SECTIONS: dict[str, tuple[Callable[[int, Console], dict[str, Any]], Callable[[dict[str, Any], Console], None]]] = {
    "mmd": (bench_mmd, mmd_table),
    "window": (bench_window, window_table),
    "replica": (bench_replica, replica_table),
    "serving": (bench_serving, serving_table),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="interleaved repeats of every section")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--run-dir", type=Path, help="a trained quickstart run for the replica section")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "monitor_overhead.json")
    args = parser.parse_args()
    console = Console()
    # the machine is shared: record its load so numbers can be read against it
    result: dict[str, Any] = {
        "repeats": args.repeats,
        "loadavg_before": os.getloadavg(),
        "cpus": os.cpu_count(),
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "numpy's default"),
    }
    # serving before replica: the replica section replays the batch sizes serving formed at c=32, on its model
    seconds: dict[str, float] = {}
    for name in sorted(args.sections, key=lambda name: name == "replica"):
        started = time.monotonic()
        if name == "replica":
            serving = result.get("serving", {})
            run_dir = args.run_dir or (Path(serving["run_dir"]) if "run_dir" in serving else None)
            result[name] = bench_replica(args.repeats, console, run_dir, serving.get("batch_sizes c=32"))
        else:
            result[name] = SECTIONS[name][0](args.repeats, console)
        seconds[name] = time.monotonic() - started
    result["seconds"] = seconds
    if {"replica", "serving"} <= result.keys():
        result["serving"]["accounted c=32"] = accounted_cost(result["serving"], result["replica"])
    for name in args.sections:
        SECTIONS[name][1](result[name], console)
    result["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
