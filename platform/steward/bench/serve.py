"""One serving cell: deploy the trained run with the cell's serve settings, load it, take the deployment down."""

import json
from pathlib import Path

from steward.bench.load import generate
from steward.data import raw_inputs
from steward.spec import JobSpec

BODIES = 64  # distinct request bodies cycled through, so no cache sees the same request twice in a row


def training_key(spec: JobSpec) -> str:
    """What decides the trained model: cells equal in everything but serving share one training run."""
    return json.dumps(
        spec.model_dump(mode="json", exclude={"name", "output_dir", "serve", "monitor", "bench"}), sort_keys=True
    )


def request_bodies(spec: JobSpec) -> list[dict]:
    """Predict requests made of validation (else train) records, bench.load.instances records each."""
    assert spec.bench is not None
    per = spec.bench.load.instances
    split = "validation" if "validation" in spec.data.splits else "train"
    records = raw_inputs(spec, split, BODIES * per)
    return [{"instances": records[i : i + per]} for i in range(0, len(records) - per + 1, per)]


def run_serve_cell(spec: JobSpec, run_dir: Path, port: int) -> dict:
    """Latency and throughput at every concurrency level of bench.load, on a fresh deployment of this cell."""
    from ray import serve

    from steward.serve.deploy import deploy

    assert spec.bench is not None
    deployed = deploy(spec, run_dir, port=port)
    try:
        levels = generate(f"{deployed.url.rstrip('/')}/predict", request_bodies(spec), spec.bench.load)
    finally:
        serve.delete(deployed.name)
    return {"levels": levels, "max_qps": max(level["qps"] for level in levels), "run_dir": str(run_dir)}
