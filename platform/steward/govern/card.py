"""Model cards (Mitchell et al., 2019) written into the run folder after training: model_card.json + model_card.md.

The card is filled from what the run folder records about what happened (resolved spec and its hash, the data
actually read and its content hash, the model's parameter count, the training history, metrics.json) and from
the spec's `governance` section. Files other stages may add (privacy, explanations, sweep results) are summarised
when present and left out when not. The JSON is checked against model_card.schema.json (kept beside this file).
"""

import csv
import hashlib
import json
import time
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from steward.errors import StewardError
from steward.govern import audit
from steward.govern.audit import file_hash
from steward.govern.card_markdown import render_markdown
from steward.spec import JobSpec

SCHEMA_FILE = Path(__file__).with_name("model_card.schema.json")
CARD_JSON, CARD_MD = audit.CARD_FILE, "model_card.md"
SCHEMA_VERSION = "1.0"
# Files other stages write into a run folder; the first one found of each kind is summarised.
PRIVACY_FILES = ("privacy.json", "privacy_report.json")
EXPLANATION_FILES = ("explanations.json", "explain/summary.json", "explanations/summary.json")


@cache
def card_schema() -> dict[str, Any]:
    """The JSON Schema every model_card.json must meet."""
    return json.loads(SCHEMA_FILE.read_text())


def validate_card(card: dict[str, Any]) -> None:
    """Raise ValueError naming the first place where `card` breaks the schema."""
    import jsonschema

    try:
        jsonschema.validate(card, card_schema())
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "<root>"
        raise ValueError(f"model card does not match {SCHEMA_FILE.name} at {where}: {err.message}") from None


def data_hash(spec: JobSpec) -> str:
    """SHA-256 over the rows the job reads (every split, every column used), in split order: same data, same hash."""
    from steward.data.partition import resolve_columns, split_tables
    from steward.data.sources import load_source

    source = load_source(spec.data, spec.seed)
    tables = split_tables(source, resolve_columns(spec, source), spec.data.splits, spec.seed)
    digest = hashlib.sha256()
    for role in sorted(tables):
        for column in sorted(tables[role]):
            values = tables[role][column]
            digest.update(f"{role}/{column}:".encode())
            if isinstance(values, np.ndarray):
                digest.update(f"{values.dtype}{values.shape}".encode() + np.ascontiguousarray(values).tobytes())
            else:
                digest.update(json.dumps(list(values), default=str).encode())
    return digest.hexdigest()


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _first_json(run_dir: Path, names: tuple[str, ...]) -> Any:
    return next((_json(run_dir / n) for n in names if (run_dir / n).exists()), None)


def _training(spec: JobSpec, run_dir: Path, status: dict[str, Any]) -> dict[str, Any]:
    """What training did: strategy, ZeRO stage, workers, epochs, time, throughput, parameter count, adapter."""
    history = [json.loads(line) for line in _lines(run_dir / "history.jsonl")]
    epochs = [r for r in history if r.get("kind") == "epoch"]
    model_meta = _json(run_dir / "model" / "model.json") or {}
    dist, train = spec.distributed, spec.train
    return {
        "num_parameters": model_meta.get("num_parameters"),
        # what a LoRA adapter adapted and how many parameters trained; null when every weight trained
        "adapter": model_meta.get("adapter"),
        "strategy": dist.strategy,
        "zero_stage": dist.zero_stage,
        "workers": dist.num_workers,
        "use_gpu": dist.use_gpu,
        "precision": train.precision,
        "optimizer": train.optimizer.model_dump(mode="json"),
        "batch_size_per_worker": spec.data.batch_size,
        "epochs_planned": train.epochs,
        "epochs_run": max((r["epoch"] for r in epochs), default=0),
        "train_time_s": round(sum(r.get("epoch_seconds", 0.0) for r in epochs), 3),
        # from the run's start (a resumed run's first start) to the card, which is written as training ends
        "wall_time_s": round(time.time() - status["started"], 3) if "started" in status else None,
        "samples_per_s": epochs[-1].get("samples_per_s") if epochs else None,
        # real (unpadded) tokens a second over all workers, for text models; null for images and sequences
        "tokens_per_s": epochs[-1].get("tokens_per_s") if epochs else None,
        "final_train_loss": epochs[-1].get("train_loss") if epochs else None,
    }


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _tuning(run_dir: Path, spec: JobSpec) -> dict[str, Any] | None:
    """A sweep's summary from results.csv / best.yaml, when a sweep chose this model."""
    results = run_dir / "results.csv"
    if spec.tune is None or not results.exists():
        return None
    with results.open() as f:
        rows = list(csv.DictReader(f))
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    best = yaml.safe_load((run_dir / "best.yaml").read_text()) if (run_dir / "best.yaml").exists() else None
    header = next(iter((run_dir / "best.yaml").read_text().splitlines()), "") if best else ""
    return {
        "metric": spec.tune.metric,
        "mode": spec.tune.mode,
        "search": spec.tune.search,
        "scheduler": spec.tune.scheduler.name,
        "trials": len(rows),
        "trial_status": statuses,
        "search_space": list(spec.tune.search_space),
        "on_finish": spec.tune.on_finish,
        "best": header.lstrip("# ").strip() or None,
    }


def _governance(spec: JobSpec) -> dict[str, Any]:
    gov = spec.governance
    if gov is None:
        return {
            "owners": [],
            "contact": "",
            "intended_use": [],
            "out_of_scope_uses": [],
            "risk": "unspecified",
            "ethical_considerations": [],
            "caveats_and_recommendations": [],
            "licence": {"data": "", "model": ""},
            "missing": ["governance"],
        }
    return {**gov.model_dump(mode="json"), "missing": gov.missing_card_fields()}


def build_card(run_dir: str | Path, spec: JobSpec | None = None, data_sha256: str | None = None) -> dict[str, Any]:
    """The model card of a finished run, from its folder (its spec.yaml, status, metrics, model, history).

    `spec` is the spec the model was trained with when it differs from the run's spec.yaml (a sweep's best trial).
    """
    from steward.runs import read_spec

    run_dir = Path(run_dir)
    run_spec = read_spec(run_dir)
    spec = spec or run_spec
    status, metrics = _json(run_dir / "status.json") or {}, _json(run_dir / "metrics.json")
    if metrics is None:
        raise ValueError(f"{run_dir}: no metrics.json; a card is written for a run that finished training")
    gov, groups = _governance(spec), metrics.get("groups", {})
    gate = metrics.get("fairness_gate", "not_evaluated")
    return {
        "schema_version": SCHEMA_VERSION,
        "model_details": _model_details(spec, run_spec, run_dir, status, gov),
        "intended_use": {
            "primary_uses": gov["intended_use"],
            "out_of_scope_uses": gov["out_of_scope_uses"],
            "risk": gov["risk"],
        },
        "factors": {
            "group_columns": list(spec.data.group_columns),
            "groups_evaluated": {column: sorted(values) for column, values in groups.items()},
        },
        "metrics": {"names": list(metrics.get("overall", {})), "split": metrics.get("split"), "fairness_gate": gate},
        **_data_sections(spec, run_dir, metrics, data_sha256 or data_hash(spec)),
        "training": _training(spec, run_dir, status),
        "quantitative_analyses": {
            "overall": metrics.get("overall", {}),
            "per_group": groups,
            "intervals": metrics.get("intervals"),
        },
        "fairness": {
            "gate": gate,
            "problems": metrics.get("fairness_gate_problems", []),
            "report": metrics.get("fairness"),
            "mitigation": metrics.get("mitigation"),
        },
        "explanations": _first_json(run_dir, EXPLANATION_FILES),
        "tuning": _tuning(run_dir, run_spec),
        "ethical_considerations": gov["ethical_considerations"],
        "caveats_and_recommendations": [*gov["caveats_and_recommendations"], _evaluated_on(spec, metrics)],
        "completeness": {"complete": not gov["missing"], "missing": gov["missing"]},
        # the audit log's last event when the card was written: a log cut back before it fails `audit verify`
        "audit": audit.last_pin(audit.log_path(run_spec.output_dir)),
    }


def _model_details(
    spec: JobSpec, run_spec: JobSpec, run_dir: Path, status: dict[str, Any], gov: dict[str, Any]
) -> dict[str, Any]:
    from steward.runs import spec_hash

    model_meta = _json(run_dir / "model" / "model.json") or {}
    return {
        "name": spec.name,
        "description": spec.description,
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "owners": gov["owners"],
        "contact": gov["contact"],
        "family": spec.model.family,
        "task": spec.model.task,
        "architecture": spec.model.params.model_dump(mode="json"),
        "num_parameters": model_meta.get("num_parameters"),
        "licence": gov["licence"],
        "spec_hash": status.get("spec_hash") or spec_hash(run_spec),
        "model_sha256": file_hash(run_dir / "model" / "model.safetensors"),
    }


def _data_sections(spec: JobSpec, run_dir: Path, metrics: dict[str, Any], data_sha256: str) -> dict[str, Any]:
    """Evaluation data and training data: where from, which rows (their hash), and what privacy masked."""
    data = (_json(run_dir / "model" / "model.json") or {}).get("data", {})
    return {
        "evaluation_data": {
            "source": spec.data.source,
            "split": metrics.get("split"),
            "num_samples": metrics.get("num_samples"),
            "data_sha256": data_sha256,
        },
        "training_data": {
            "source": spec.data.source,
            "splits": spec.data.splits,
            "data_sha256": data_sha256,
            "modality": data.get("modality"),
            "labels": data.get("label_names", []),
            "privacy": _first_json(run_dir, PRIVACY_FILES) or metrics.get("privacy"),
        },
    }


def _evaluated_on(spec: JobSpec, metrics: dict[str, Any]) -> str:
    """The caveat every card carries: what the numbers were measured on, and so what they do not cover."""
    return (
        f"Measured on {metrics.get('num_samples')} examples of the {metrics.get('split')} split of "
        f"{spec.data.source}; performance on other data, populations or inputs is not known."
    )


def write_card(run_dir: str | Path, spec: JobSpec | None = None, data_sha256: str | None = None) -> dict[str, Any]:
    """Build, check against the schema, and write model_card.json and model_card.md; return the card."""
    run_dir = Path(run_dir)
    card = build_card(run_dir, spec, data_sha256)
    validate_card(card)
    (run_dir / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
    (run_dir / CARD_MD).write_text(render_markdown(card))
    return card


def read_card(run_dir: str | Path) -> dict[str, Any]:
    """A run's model_card.json (StewardError when the run has none)."""
    path = Path(run_dir) / CARD_JSON
    if not path.exists():
        raise StewardError(f"{run_dir}: no {CARD_JSON}; cards are written when training finishes (steward train)")
    return json.loads(path.read_text())
