"""What a benchmark shows: per-cell median / min / max, ratios to the baseline, the table, bench.md, plots, compare."""

import json
import statistics
from pathlib import Path

from rich.table import Table

# What must match between two machines for their results to compare.
COMPARED = ("cpu", "cores", "gpu", "ram_gib", "torch", "ray", "deepspeed", "transformers")


SKIPPED = ("started", "timed_steps", "run_dir")
TRAIN_COLUMNS = [
    ("parameters", "params M", "{:.0f}"),
    ("samples_per_s", "samples/s", "{:.3g}"),
    ("tokens_per_s", "tokens/s", "{:.3g}"),
    ("time_to_first_step_s", "1st step s", "{:.1f}"),
    ("memory_added_mb", "mem MB", "{:.0f}"),
    ("memory_formula_mb", "formula MB", "{:.0f}"),
    ("peak_memory_mb", "peak MB", "{:.0f}"),
    ("estimate_mb", "estimate MB", "{:.0f}"),
    ("flops_per_s", "GFLOP/s", "{:.3g}"),
    ("ceiling_fraction", "of peak", "{:.1%}"),
]
SCALE = {"flops_per_s": 1e-9, "parameters": 1e-6}
# Why a cell has no measurement: the memory estimate refused it, or a worker ran out of memory.
OUTCOMES = {"refused": "refused by the estimate", "out_of_memory": "out of memory"}


def metrics(run: dict, ceiling: float) -> dict[str, float]:
    """One run's numbers, flat: serving levels become c<concurrency>_<name>."""
    flat = {k: float(v) for k, v in run.items() if k not in SKIPPED and isinstance(v, int | float)}
    for level in run.get("levels", []):
        flat |= {f"c{level['concurrency']}_{k}": float(v) for k, v in level.items() if k != "concurrency" and v}
    if "flops_per_s" in flat:
        flat["ceiling_fraction"] = flat["flops_per_s"] / ceiling
    if "estimate_mb" in flat and "peak_memory_mb" in flat:
        flat["estimate_error"] = flat["estimate_mb"] / flat["peak_memory_mb"] - 1
    return flat


def summarise(result: dict) -> None:
    """Median, min and max of every metric per cell, and each median over the baseline cell's median."""
    ceiling = result["ceiling"]["flops_per_s"]
    for cell in result["cells"]:
        runs = [metrics(run, ceiling) for run in cell["runs"]]
        names = dict.fromkeys(name for run in runs for name in run)
        cell["summary"] = {
            name: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
            for name in names
            if (v := [run[name] for run in runs if name in run])
        }
    base = next(c for c in result["cells"] if c["label"] == result["baseline"])["summary"]
    for cell in result["cells"]:
        cell["ratios"] = {
            name: s["median"] / base[name]["median"]
            for name, s in cell["summary"].items()
            if name in base and base[name]["median"]
        }


def columns(result: dict) -> list[tuple[str, str, str]]:
    """(metric, header, format) of the table: training's headline numbers, then each serving level's."""
    shown = []
    if "train_throughput" in result["measure"]:
        shown += TRAIN_COLUMNS
    for c in result["load"]["concurrency"] if _serving(result) else []:
        if "serve_latency" in result["measure"]:
            shown += [(f"c{c}_p50_ms", f"p50 ms c={c}", "{:.2f}"), (f"c{c}_p99_ms", f"p99 ms c={c}", "{:.2f}")]
        if "serve_throughput" in result["measure"]:
            shown += [(f"c{c}_qps", f"req/s c={c}", "{:.0f}")]
    return shown


def cell_rows(result: dict, ratios_apart: bool = False) -> list[list[str]]:
    """Each cell: its label, runs done, then each column's median and its ratio to the baseline.

    The ratio follows the number in brackets, or (`ratios_apart`, for narrow terminals) fills a row of its own.
    """
    rows = []
    for cell in result["cells"]:
        values, ratios = [], []
        for name, _, fmt in columns(result):
            s, ratio = cell.get("summary", {}).get(name), cell.get("ratios", {}).get(name)
            values.append("" if s is None else fmt.format(s["median"] * SCALE.get(name, 1)))
            ratios.append(f"{ratio:.2f}x" if ratio else "")
        label = cell["label"] + (" (baseline)" if cell["label"] == result["baseline"] else "") + _outcome(cell)
        if ratios_apart:
            rows += [[label, str(len(cell["runs"])), *values], ["", "", *ratios]]
        else:
            rows.append(
                [
                    label,
                    str(len(cell["runs"])),
                    *(f"{v} ({r})" if r else v for v, r in zip(values, ratios, strict=True)),
                ]
            )
    return rows


def _outcome(cell: dict) -> str:
    """' (refused by the estimate)' or ' (out of memory)' when every run of the cell ended so, else ''."""
    ends = {key for run in cell["runs"] for key in OUTCOMES if key in run}
    return "".join(f" ({OUTCOMES[key]})" for key in sorted(ends)) if cell["runs"] else ""


def live_table(result: dict, planned: int) -> Table:
    done = sum(len(c["runs"]) for c in result["cells"])
    table = Table(title=f"bench {result['name']}: {done}/{planned} runs (medians; ratios to the baseline below)")
    for header in ["cell", "runs", *(h for _, h, _ in columns(result))]:
        table.add_column(header, justify="left" if header == "cell" else "right", overflow="fold")
    for i, row in enumerate(cell_rows(result, ratios_apart=True)):
        table.add_row(*row, style="dim" if i % 2 else None, end_section=bool(i % 2))
    return table


def markdown(result: dict) -> str:
    """bench.md: the machine, then the table (median over repeats, ratio to the baseline in brackets)."""
    m, ceiling = result["manifest"], result["ceiling"]
    lines = [
        f"# bench {result['name']}",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu'] or 'none'}; "
        f"torch {m['torch']}, ray {m['ray']}, deepspeed {m['deepspeed']}, transformers {m['transformers']}; "
        f"spec {m['spec_hash']}, commit {(m['git_commit'] or 'unknown')[:12]}.",
        f"Matmul ceiling: {ceiling['flops_per_s'] / 1e9:.1f} GFLOP/s (fp32 {ceiling['size']}^3 GEMM, "
        f"{ceiling['threads']} threads). Medians of {max(len(c['runs']) for c in result['cells'])} interleaved "
        "repeats; ratio to the baseline in brackets.",
        "",
    ]
    headers = ["cell", "runs", *(h for _, h, _ in columns(result))]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cell_rows(result)]
    ended = [
        (cell["label"], key, run[key])
        for cell in result["cells"]
        for run in cell["runs"]
        for key in OUTCOMES
        if key in run
    ]
    if ended:
        lines += ["", *(f"- {label}: {OUTCOMES[key]}: {why}" for label, key, why in ended)]
    return "\n".join(lines) + "\n"


def plot(result: dict, run_dir: Path) -> None:
    """throughput.png (median with min-max bars per cell) and, for training, memory.png against the formula."""
    cells = result["cells"]
    if "train_throughput" in result["measure"]:
        _bars(cells, "samples_per_s", "training samples/s", run_dir / "throughput.png")
        _bars(
            cells,
            "memory_added_mb",
            "peak memory added per worker, MB",
            run_dir / "memory.png",
            formula=[c["summary"].get("memory_formula_mb", {}).get("median", 0) for c in cells],
        )
    if _serving(result):
        top = max(result["load"]["concurrency"])
        name = "serve_throughput.png" if "train_throughput" in result["measure"] else "throughput.png"
        _bars(cells, f"c{top}_qps", f"requests/s at concurrency {top}", run_dir / name)


def _serving(result: dict) -> bool:
    return any(m.startswith("serve_") for m in result["measure"])


def _bars(cells: list[dict], metric: str, label: str, path: Path, formula: list[float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt  # plotting only: `steward bench compare` needs no matplotlib

    stats = [c.get("summary", {}).get(metric, {"median": 0, "min": 0, "max": 0}) for c in cells]
    medians = [s["median"] for s in stats]
    spread = [
        [m - s["min"] for m, s in zip(medians, stats, strict=True)],
        [s["max"] - m for m, s in zip(medians, stats, strict=True)],
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cells)), 4))
    ax.bar(range(len(cells)), medians, yerr=spread, capsize=4, color="#4c72b0", label="measured (median, min-max)")
    if formula is not None:
        ax.scatter(range(len(cells)), formula, color="black", marker="_", s=600, zorder=3, label="ZeRO formula")
        ax.legend()
    ax.set_xticks(range(len(cells)), [c["label"] for c in cells], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: dict, run_dir: Path) -> None:
    """bench.json, bench.md and the plots."""
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2))
    (run_dir / "bench.md").write_text(markdown(result))
    plot(result, run_dir)


def compare(a: dict, b: dict) -> tuple[list[dict], list[str]]:
    """B's median over A's for every metric of every cell both hold; and where their machines differ.

    Medians are recomputed from each file's runs, so both sides are summarised the same way.
    """
    summarise(a)
    summarise(b)
    warnings = [
        f"{key} differs: {a['manifest'].get(key)} vs {b['manifest'].get(key)}"
        for key in COMPARED
        if a["manifest"].get(key) != b["manifest"].get(key)
    ]
    theirs = {c["label"]: c.get("summary", {}) for c in b["cells"]}
    rows = []
    for cell in a["cells"]:
        other = theirs.get(cell["label"])
        if other is None:
            continue
        for name, s in cell.get("summary", {}).items():
            if name in other and s["median"]:
                ratio = other[name]["median"] / s["median"]
                rows.append(
                    {
                        "cell": cell["label"],
                        "metric": name,
                        "a": s["median"],
                        "b": other[name]["median"],
                        "ratio": ratio,
                    }
                )
    return rows, warnings
