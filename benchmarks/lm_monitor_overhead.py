"""What watching a language model costs its replica, side by side in one process: tokens/s with and without it.

    python benchmarks/lm_monitor_overhead.py [--streams 8] [--tokens 128] [--rounds 3] [--repeats 7]

The models of benchmarks/generate_overhead.py (GPT-2 2x64 and 4x256, trained in-process), each driven as a
generation replica drives it, without HTTP: the replica's decoder (continuous batching, one thread) and its handlers'
token-to-text path (`generate_app.pieces`), --streams requests at a time, --rounds rounds a cell, on one torch thread.
Watched, the decoder also takes each prompt's embedding at prefill, each finished completion is queued as the
replica queues it, and the queue is counted into a window state (signals, personal-data scan, training n-grams) every
2 s and at the end, as the replica's pushes do; the Ray call of a push and the monitor actor, another process, are
left out. Unwatched and watched cells alternate, repeat after repeat; the ratio is taken within each repeat.
Target (issue 25): watched / unwatched >= 0.97. Writes benchmarks/results/lm_monitor_overhead.json.
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # generate_overhead: the models and prompts
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from generate_overhead import MODELS, PROMPTS, train  # noqa: E402
from steward.bench.machine import manifest  # noqa: E402
from steward.monitor.checks import live_state  # noqa: E402
from steward.monitor.reference import load_reference  # noqa: E402
from steward.serve.decoder import Decoder, Sampling, Sequence  # noqa: E402
from steward.serve.generate_app import pieces  # noqa: E402
from steward.serve.lm import TextStream, open_language_model  # noqa: E402
from steward.serve.lm_monitor import Completion, CompletionQueue  # noqa: E402
from steward.serve.model import model_source  # noqa: E402
from steward.spec.monitor import MonitorSpec  # noqa: E402
from steward.spec.privacy import PrivacySpec  # noqa: E402

PUSH_INTERVAL_S = 2.0  # monitor.push_interval_s's default


async def one(lm, decoder: Decoder, prompt: str, queue: CompletionQueue | None, args) -> int:
    """One request as a handler serves it: its tokens turned into text; watched, its completion queued."""
    sampling = Sampling(args.tokens, temperature=0, logit_bias={token: -100.0 for token in lm.eos})
    sequence = Sequence(lm.encode(prompt), sampling)
    decoder.submit(sequence)
    text, count = [], 0
    async for piece, finish, count in pieces(sequence, TextStream(lm, [])):
        text.append(piece)
        if finish is not None and queue is not None:
            logprob = sum(sequence.logprobs[:count])
            queue.append(
                Completion(sequence.prompt, sequence.ids[:count], logprob, finish, "".join(text), sequence.embedding)
            )
    return count


async def tokens_per_s(lm, decoder: Decoder, queue: CompletionQueue | None, args) -> float:
    start, tokens, pushed = time.perf_counter(), 0, time.perf_counter()
    for _ in range(args.rounds):
        tokens += sum(await asyncio.gather(*(one(lm, decoder, p, queue, args) for p in PROMPTS[: args.streams])))
        if queue is not None and time.perf_counter() - pushed >= PUSH_INTERVAL_S:
            queue.count_into(live_state(queue.bins))
            pushed = time.perf_counter()
    if queue is not None:
        queue.count_into(live_state(queue.bins))
    return tokens / (time.perf_counter() - start)


def measure(name: str, spec, run_dir: Path, args) -> dict:
    lm = open_language_model(model_source(spec, run_dir))
    watching = MonitorSpec.model_validate({"drift": {}, "leaks": {}, "window": {"size": 200}})
    bins = load_reference(run_dir / "model").bins()
    queue = CompletionQueue(bins, watching, run_dir, PrivacySpec(), lm.tokenizer.unk_token_id)
    plain, watched = Decoder(lm, 16), Decoder(lm, 16, embed=True)
    cells: dict[str, list[float]] = {"unwatched tokens/s": [], "watched tokens/s": []}
    for _ in range(args.repeats):
        cells["unwatched tokens/s"].append(asyncio.run(tokens_per_s(lm, plain, None, args)))
        cells["watched tokens/s"].append(asyncio.run(tokens_per_s(lm, watched, queue, args)))
    pairs = zip(cells["watched tokens/s"], cells["unwatched tokens/s"], strict=True)
    cells["watched / unwatched"] = [w / u for w, u in pairs]
    return {"model": name, "figures": {cell: spread(values) for cell, values in cells.items()}}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "each": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lm_monitor_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the replica (serve.torch_threads: 1)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: train(Path(tmp) / str(i), extra) for i, (name, extra) in enumerate(MODELS.items())}
        results = [measure(name, spec, run_dir, args) for name, (spec, run_dir) in runs.items()]
        machine = manifest(runs[next(iter(runs))][0])
    report = {"machine": machine, "settings": vars(args) | {"out": str(args.out)}, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    table = Table(title=f"Watching a language model, replica side, {args.streams} streams; {machine['cpu']}")
    for column in ("model", "cell", "median", "min", "max"):
        table.add_column(column, justify="right")
    for result in results:
        for cell, f in result["figures"].items():
            table.add_row(result["model"], cell, f"{f['median']:.3f}", f"{f['min']:.3f}", f"{f['max']:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
