"""Rollout overhead, side by side in one run: a canary's routing and a shadow's mirroring vs the champion alone.

    python benchmarks/rollout_overhead.py [--repeats 3] [--requests 400] [--seconds 3] [--clients 1 8]

Two quickstart CNNs (the champion, and a challenger trained with another seed) served with the same serve section
(one replica, half a CPU, one torch thread, batching off: the path where a fixed per-request cost shows most) and
the quickstart's monitor section, as three applications on one Serve:
- alone: the champion deployed by itself (`steward.serve.deploy.deploy`), the baseline;
- canary: `start_rollout` in canary mode, one step at share 0.5: the challenger answers half the requests;
- shadow: `start_rollout` in shadow mode, one step at share 1.0: the champion answers every request and each is
  mirrored to the challenger off the request path.
The rollouts' gates cannot decide (min_records 10,000,000; bias, drift, accuracy and selection-rate gates off;
error rate gated at 1.0), so the share holds for the whole run; each repeat checks it did (state, share, and each
arm's requests as the rollout actor counted them). The load generator (`steward.bench.load`) sends no client
header, so the canary draws each request's arm at random; the sticky header's hashing is timed offline instead,
with `Arms.pick` itself.

Each repeat deploys the three afresh (a replica process keeps its own speed all its life), waits until the
replicas follow the rollouts' shares, then runs sequential requests (p50 / p99 over `--requests`) and `--seconds`
at 8 clients, in ROUNDS of alone, canary, shadow then backwards, with each process's CPU a request over every run
(the replica, each arm's monitor actor, the rollout actor, the load generator, the machine), and reads where a
request's time goes (Server-Timing at c=1). Judged, repeat by repeat: canary p50 - alone p50 at c=1 (target
<= 0.5 ms) and the shadow's p50 over alone's at c=1 (target <= 5% more); medians over repeats with each repeat's
figure.
Writes benchmarks/results/rollout_overhead.json and prints the tables, with the CPU model in their titles.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.serving's fast trained runs, serve_overhead's helpers

import requests  # noqa: E402
from benchmarks.monitor_overhead import _process  # noqa: E402
from benchmarks.serve_overhead import breakdown, breakdown_table  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from steward.bench.load import generate  # noqa: E402
from steward.bench.machine import manifest  # noqa: E402
from steward.ray_env import free_port  # noqa: E402
from steward.spec.bench import LoadSpec  # noqa: E402
from steward.spec.serve import ServeSpec  # noqa: E402

CELLS = ("alone", "canary", "shadow")
SHARES = {"canary": 0.5, "shadow": 1.0}
ROUNDS = 2  # runs per cell and concurrency in a repeat: forward, then backward
TARGETS = {"canary_p50_ms": 0.5, "shadow_p50_rise": 0.05}
UNDECIDED = {  # gates that cannot end a step during the run: the share stays where it is set
    "min_records": 10_000_000,
    "gates": {
        "bias": False,
        "drift": False,
        "max_selection_rate_gap": None,
        "max_accuracy_drop": None,
        "max_error_rate_increase": 1.0,
    },
}


def job_for(spec, cell: str, repeat: int):
    """The spec of `cell`'s application in `repeat`: one serve section for all three (a rollout section beside it in
    the rollout cells), the quickstart's monitor section unchanged."""
    name = f"{cell}-{repeat}"
    serve = {"name": name, "route_prefix": f"/{name}", "num_replicas": 1, "num_cpus": 0.5, "batching": None}
    if cell in SHARES:
        serve["rollout"] = {"mode": cell, "steps": [SHARES[cell]], **UNDECIDED}
    return spec.model_copy(update={"serve": ServeSpec.model_validate(serve)})


def deploy_cells(spec, champion: Path, challenger: Path, port: int, repeat: int, bodies: list[dict]) -> dict:
    from steward.serve.deploy import deploy, start_rollout

    urls = {"alone": deploy(job_for(spec, "alone", repeat), champion, port=port).url}
    for cell in SHARES:
        urls[cell] = start_rollout(job_for(spec, cell, repeat), champion, challenger, port=port).url
        following(urls[cell], SHARES[cell], bodies[0])
    return urls


def following(url: str, share: float, body: dict, timeout: float = 60.0) -> None:
    """Wait until the replica routes by the rollout's share (it asks the rollout actor once a request came)."""
    deadline = time.monotonic() + timeout
    while True:
        requests.post(f"{url}/predict", json=body, timeout=30).raise_for_status()
        rollout = requests.get(f"{url}/info", timeout=30).json()["rollout"]
        if rollout["state"] == "running" and rollout["share"] == share:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: the replica routes by {rollout}, not share {share}, after {timeout:.0f} s")
        time.sleep(0.2)


def remove_cells(urls: dict[str, str]) -> None:
    """Delete the repeat's applications all at once (they drain slowly), then their monitors and rollouts."""
    from ray import serve

    from steward.monitor.actor import stop_monitors
    from steward.serve.rollout import stop_rollout

    names = {url.rsplit("/", 1)[-1] for url in urls.values()}
    for name in names:
        serve.delete(name, _blocking=False)
    while names & set(serve.status().applications):
        time.sleep(0.5)
    for name in names:
        stop_monitors(name)
        stop_rollout(name)


def arms_seen(name: str, sent: int, timeout: float = 30.0) -> dict[str, Any]:
    """The rollout's state, share and each arm's requests once its counts cover the `sent` requests (replicas send
    them every interval_s)."""
    import ray

    from steward.serve.rollout import find_rollout

    deadline = time.monotonic() + timeout
    while True:
        status = ray.get(find_rollout(name).status.remote())
        if status["arms"]["champion"]["requests"] + status["arms"]["challenger"]["requests"] >= sent:
            break
        if time.monotonic() > deadline:
            break  # reported as counted; the check below judges it
        time.sleep(0.5)
    seen = {"state": status["state"], "share": status["share"], "arms": status["arms"]}
    if status["state"] != "running" or status["share"] != SHARES[name.split("-")[0]]:
        raise RuntimeError(f"rollout {name} did not hold its share during the run: {seen}")
    return seen


def processes(urls: dict[str, str], runs: tuple[Path, Path]) -> dict[str, dict[str, Any]]:
    """Each cell's processes: its replica, its arms' monitor actors, its rollout actor (psutil handles)."""
    import psutil
    import ray

    from steward.monitor.actor import NAMESPACE, actor_name
    from steward.serve.rollout import find_rollout

    def pid(handle: Any) -> Any:
        return psutil.Process(ray.get(handle.__ray_call__.remote(lambda _: os.getpid())))

    out: dict[str, dict[str, Any]] = {}
    for cell, url in urls.items():
        name = url.rsplit("/", 1)[-1]
        out[cell] = {"replica": _process(f"ray::ServeReplica:{name}:")}
        for arm, run in zip(("champion", "challenger"), runs, strict=True):
            if arm == "champion" or cell in SHARES:
                out[cell][f"{arm} monitor"] = pid(ray.get_actor(actor_name(name, run), namespace=NAMESPACE))
        if cell in SHARES:
            out[cell]["rollout actor"] = pid(find_rollout(name))
    return out


def cpu_seconds(procs: dict[str, Any]) -> dict[str, float]:
    """CPU seconds so far of `procs`, of this process (the load generator) and of the machine (steal excluded)."""
    import psutil

    busy = psutil.cpu_times()
    spent = {role: sum(proc.cpu_times()[:2]) for role, proc in procs.items()}
    client = sum(psutil.Process().cpu_times()[:2])
    return spent | {"client": client, "machine": busy.user + busy.nice + busy.system + busy.irq + busy.softirq}


def run_repeat(spec, runs, port: int, repeat: int, bodies: list[dict], args, console: Console) -> dict:
    urls = deploy_cells(spec, *runs, port, repeat, bodies)
    measured: dict[str, dict[int, list[dict]]] = {cell: {c: [] for c in args.clients} for cell in CELLS}
    sent = dict.fromkeys(CELLS, 0)
    try:
        procs = processes(urls, runs)
        for c in args.clients:
            load = LoadSpec(concurrency=[c], seconds=120, max_requests=args.requests)
            if c > 1:
                load = LoadSpec(concurrency=[c], seconds=args.seconds)
            for k in range(ROUNDS):
                for cell in CELLS[:: -1 if (repeat + k) % 2 else 1]:  # alternate which cell goes first
                    before = cpu_seconds(procs[cell])
                    [level] = generate(f"{urls[cell]}/predict", bodies, load)
                    after, count = cpu_seconds(procs[cell]), level["requests"] + load.warmup_requests
                    level["cpu_us"] = {role: (after[role] - before[role]) / count * 1e6 for role in after}
                    measured[cell][c].append(level)
                    sent[cell] += count
        where = {cell: breakdown(f"{urls[cell]}/predict", bodies, args.requests // 2, 1) for cell in CELLS}
        seen = {cell: arms_seen(f"{cell}-{repeat}", sent[cell]) for cell in SHARES}
    finally:
        remove_cells(urls)
    pooled = {cell: {c: _pooled(levels) for c, levels in by_c.items()} for cell, by_c in measured.items()}
    console.print(
        f"repeat {repeat + 1}: "
        + ", ".join(f"{cell} p50 {pooled[cell][1]['p50_ms']:.3f} ms" for cell in CELLS if 1 in pooled[cell])
    )
    return {"cells": pooled, "runs": measured, "breakdown_ms": where, "rollouts": seen}


def _pooled(levels: list[dict]) -> dict[str, Any]:
    """A repeat's runs of one cell at one concurrency: medians of their p50 / p99, their pooled requests/s, and
    their mean CPU us a request by process."""
    return {k: statistics.median(level[k] for level in levels) for k in ("p50_ms", "p99_ms")} | {
        "qps": sum(level["requests"] for level in levels) / sum(level["requests"] / level["qps"] for level in levels),
        "cpu_us": {role: statistics.mean(level["cpu_us"][role] for level in levels) for role in levels[0]["cpu_us"]},
    }


def summarise(repeats: list[dict], clients: list[int]) -> dict[str, Any]:
    """Per concurrency: each cell's medians over repeats, and the judged comparisons repeat by repeat."""
    out: dict[str, Any] = {}
    for c in clients:
        cells = {cell: [rep["cells"][cell][c] for rep in repeats] for cell in CELLS}
        row: dict[str, Any] = {
            cell: {k: statistics.median(r[k] for r in runs) for k in ("p50_ms", "p99_ms", "qps")}
            | {"cpu_us": {role: statistics.median(r["cpu_us"][role] for r in runs) for role in runs[0]["cpu_us"]}}
            for cell, runs in cells.items()
        }
        alone = cells["alone"]
        canary = [r["p50_ms"] - a["p50_ms"] for a, r in zip(alone, cells["canary"], strict=True)]
        shadow = [r["p50_ms"] / a["p50_ms"] - 1 for a, r in zip(alone, cells["shadow"], strict=True)]
        qps = {cell: [r["qps"] / a["qps"] for a, r in zip(alone, cells[cell], strict=True)] for cell in SHARES}
        row["canary - alone p50 ms"] = _spread(canary)
        row["shadow / alone p50 - 1"] = _spread(shadow)
        row["qps / alone"] = {cell: _spread(values) for cell, values in qps.items()}
        out[f"c={c}"] = row
    judged = out.get("c=1")
    if judged:
        out["targets"] = {
            "canary p50 - alone p50 <= 0.5 ms (c=1)": judged["canary - alone p50 ms"]["median"]
            <= TARGETS["canary_p50_ms"],
            "shadow p50 <= alone p50 + 5% (c=1)": judged["shadow / alone p50 - 1"]["median"]
            <= TARGETS["shadow_p50_rise"],
        }
    return out


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "each": values}


def pick_cost(calls: int = 200_000) -> dict[str, float]:
    """Microseconds of `Arms.pick` in this process: without a challenger (a deployment alone), and in a canary at
    share 0.5 with a random draw (no client header) and with the sticky header's hash. No Ray: the routing is set
    by hand, as a replica holds it between syncs."""
    from steward.serve.arms import Arm, Arms
    from steward.serve.rollout import RolloutTarget, Routing
    from steward.spec.rollout import RolloutSpec

    alone = Arms(Arm("champion", None, None))  # type: ignore[arg-type]  # pick never touches the model
    canary = Arms(Arm("champion", None, None), Arm("challenger", None, None))  # type: ignore[arg-type]
    canary.target = RolloutTarget("canary", "a", "b", RolloutSpec(steps=[0.5]), "runs", "id")
    canary.routing = Routing("canary", "running", 0.5)
    cases = {
        "alone": (alone, {}),
        "canary, random draw": (canary, {}),
        "canary, sticky header": (canary, {"x-client-id": "client-12345"}),
    }
    out = {}
    for name, (arms, headers) in cases.items():
        started = time.perf_counter()
        for _ in range(calls):
            arms.pick(headers)
        out[name] = (time.perf_counter() - started) / calls * 1e6
    return out


def tables(result: dict, console: Console) -> None:
    cpu, summary = result["manifest"]["cpu"], result["summary"]
    for c in result["args"]["clients"]:
        row = summary[f"c={c}"]
        table = Table(title=f"Rollouts vs the champion alone, quickstart CNN, c={c} ({cpu}, proxy: {result['proxy']})")
        for column in ("cell", "p50 ms", "p99 ms", "QPS"):
            table.add_column(column, justify="right")
        for cell in CELLS:
            table.add_row(cell, f"{row[cell]['p50_ms']:.3f}", f"{row[cell]['p99_ms']:.3f}", f"{row[cell]['qps']:.0f}")
        diff, rise = row["canary - alone p50 ms"], row["shadow / alone p50 - 1"]
        table.add_row(
            "canary - alone", _each(diff, "+.3f", " ms"), "", _each(row["qps / alone"]["canary"], ".3f", "", "x")
        )
        table.add_row(
            "shadow / alone", _each(rise, "+.1%", ""), "", _each(row["qps / alone"]["shadow"], ".3f", "", "x")
        )
        console.print(table)
    roles = list(
        dict.fromkeys(
            role
            for c in result["args"]["clients"]
            for r in summary[f"c={c}"].values()
            if isinstance(r, dict) and "cpu_us" in r
            for role in r["cpu_us"]
        )
    )
    table = Table(title=f"CPU us a request by process, medians over repeats ({cpu})")
    for column in ("cell", *roles):
        table.add_column(column, justify="right")
    for c in result["args"]["clients"]:
        for cell in CELLS:
            spent = summary[f"c={c}"][cell]["cpu_us"]
            table.add_row(f"{cell}, c={c}", *(f"{spent[role]:.0f}" if role in spent else "" for role in roles))
    console.print(table)
    for cell in SHARES:  # what the rollout actor counted, every run of a repeat together
        arms = [rep["rollouts"][cell]["arms"] for rep in result["repeats"]]
        taken = "mirrored" if cell == "shadow" else "requests"
        shares = ", ".join(f"{a['challenger'][taken] / a['champion']['requests']:.2f}" for a in arms)
        console.print(f"{cell}: challenger {taken} per champion request, each repeat: {shares}")
    for target, met in summary.get("targets", {}).items():
        console.print(f"target {target}: {'met' if met else 'MISSED'} ({cpu})")
    console.print(f"Arms.pick, us a call ({cpu}): {result['pick_us']}")


def _each(spread: dict, spec: str, unit: str, prefix: str = "") -> str:
    each = ", ".join(f"{prefix}{v:{spec}}" for v in spread["each"])
    return f"{prefix}{spread['median']:{spec}}{unit} [{each}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="Repeats, each with fresh deployments.")
    parser.add_argument("--requests", type=int, default=400, help="Sequential requests per c=1 run.")
    parser.add_argument("--seconds", type=float, default=3.0, help="Seconds per run above one client.")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="Concurrency levels; 1 is judged.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rollout_overhead.json")
    args = parser.parse_args()
    console, started = Console(), time.monotonic()
    import ray
    from ray import serve
    from tests.serving import trained_run, validation_inputs

    from steward.ray_env import prefer_high_throughput

    # As `steward serve` does for fixed replicas: HAProxy when installed, the smallest per-request base.
    proxy = "haproxy (high-throughput mode)" if prefer_high_throughput(ServeSpec()) else "Serve's default proxy"
    tmp = Path(tempfile.mkdtemp(prefix="steward-rollout-bench-"))
    console.print("training the champion and the challenger (quickstart CNN, plain torch, 2 epochs each)")
    spec, champion = trained_run(tmp / "champion", "quickstart.yaml", epochs=2)
    _, challenger = trained_run(tmp / "challenger", "quickstart.yaml", "seed=1", epochs=2)
    bodies = [{"instances": [x]} for x in validation_inputs(spec, 64)]
    result: dict[str, Any] = {"args": vars(args) | {"out": str(args.out)}, "proxy": proxy, "manifest": manifest(spec)}
    result |= {"loadavg_before": os.getloadavg(), "pick_us": pick_cost(), "monitor": spec.monitor.model_dump()}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": (port := free_port())})
    try:
        repeats = [
            run_repeat(spec, (champion, challenger), port, r, bodies, args, console) for r in range(args.repeats)
        ]
    finally:
        serve.shutdown()
        ray.shutdown()
    result |= {"summary": summarise(repeats, args.clients), "repeats": repeats}
    phases = [rep["breakdown_ms"] for rep in repeats]
    result["breakdown_ms"] = {
        cell: {k: statistics.median(p[cell].get(k, 0.0) for p in phases) for k in phases[0][cell]} for cell in CELLS
    }
    result |= {"loadavg_after": os.getloadavg(), "benchmark_s": time.monotonic() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tables(result, console)
    breakdown_table(
        f"Where a request's time goes, ms (medians at c=1; {result['manifest']['cpu']})",
        result["breakdown_ms"],
        console,
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
