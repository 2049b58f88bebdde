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


def _bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items) if items else "- (not stated)"


def _metric_table(overall: dict[str, Any], groups: dict[str, Any]) -> str:
    names = list(overall)
    rows = ["| rows | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    rows.append("| all | | " + " | ".join(_number(overall[n]) for n in names) + " |")
    for column, values in groups.items():
        for value, m in values.items():
            rows.append(
                f"| {column}={value} | {m.get('count', '')} | " + " | ".join(_number(m.get(n)) for n in names) + " |"
            )
    return "\n".join(rows)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict) and "value" in value:  # a metric with an interval
        low, high = value.get("low"), value.get("high")
        interval = f" [{low:.4f}, {high:.4f}]" if isinstance(low, float) and isinstance(high, float) else ""
        return f"{value['value']:.4f}{interval}"
    return "" if value is None else str(value)


def _fairness(fairness: dict[str, Any]) -> str:
    """The fairness gate and, per split, the per-group table of metrics.json's report (a classifier's rates or a
    language model's perplexity, each value with its bootstrap interval) and the split's fairness metrics."""
    report = fairness["report"]
    lines = [f"Fairness gate: **{fairness['gate']}**", *(f"- {p}" for p in fairness.get("problems", []))]
    if not isinstance(report, dict) or not report.get("splits"):
        return "\n".join([*lines, "", "No per-group fairness report (the spec sets no data.group_columns)."])
    column = report.get("group_column", "group")
    for split, found in report["splits"].items():
        groups = found.get("groups", {})
        names = [n for n in next(iter(groups.values()), {}) if n != "count" and not n.endswith("_ci")]
        lines += ["", f"{split} split, by {column}:", "", f"| {column} | n | " + " | ".join(names) + " |"]
        lines.append("|---|---|" + "---|" * len(names))
        for value, row in groups.items():
            cells = " | ".join(_cell(row, name) for name in names)
            lines.append(f"| {value} | {row.get('count', '')} | {cells} |")
        shown = ", ".join(f"{name} {_number(value)}" for name, value in found.get("metrics", {}).items())
        lines += ["", f"Fairness metrics ({split}): {shown or 'none'}"]
    return "\n".join(lines)


def _cell(row: dict[str, Any], name: str) -> str:
    """One table value, with its interval when the row has one (`<name>_ci`: [low, high])."""
    value, interval = row.get(name), row.get(f"{name}_ci")
    if isinstance(value, float) and isinstance(interval, list) and len(interval) == 2:
        return _number({"value": value, "low": interval[0], "high": interval[1]})
    return _number(value)


def _summary(value: Any) -> str:
    return "None recorded." if value is None else "```json\n" + json.dumps(value, indent=2) + "\n```"


def _adapter(adapter: dict[str, Any] | None) -> str:
    if adapter is None:
        return "none (every weight trained)"
    modules = ", ".join(adapter["target_modules"] or []) or "(peft's choice)"
    whole = ", ".join(adapter["trained_whole"]) or "nothing"
    return (
        f"{adapter['type']} r={adapter['r']} alpha={adapter['alpha']:g} on {modules}; trained whole: {whole}; "
        f"{adapter['trainable_parameters']} of {adapter['parameters_while_training']} parameters trained "
        f"({100 * adapter['trainable_share']:.2f}%), merged into the saved model"
    )


def _throughput(train: dict[str, Any]) -> str:
    """The last epoch's samples (and, for text, tokens) a second, as the card's Training line ends."""
    rates = [(train.get(k), unit) for k, unit in (("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"))]
    shown = [f"{value:,.0f} {unit}" for value, unit in rates if value is not None]
    return f", {', '.join(shown)}" if shown else ""


def render_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown, in the section order of Mitchell et al. (2019)."""
    d, use, train = card["model_details"], card["intended_use"], card["training"]
    quant, data = card["quantitative_analyses"], card["training_data"]
    licence = d["licence"]
    return f"""# Model card: {d["name"]} (run {d["run_id"]})

## Model details
- {d["description"] or "No description."}
- Owners: {", ".join(d["owners"]) or "(not stated)"}; contact: {d["contact"] or "(not stated)"}
- Model: {d["family"]} ({d["task"]}), {d["num_parameters"]} parameters; licence {licence["model"] or "(not stated)"}
- Spec hash {d["spec_hash"]}; model weights sha256 {d["model_sha256"]}; card written {d["date"]}

## Intended use
Risk level: **{use["risk"]}**

{_bullets(use["primary_uses"])}

Out of scope:

{_bullets(use["out_of_scope_uses"])}

## Factors
Group columns: {", ".join(card["factors"]["group_columns"]) or "none"}

## Metrics
{", ".join(card["metrics"]["names"])} on the {card["metrics"]["split"]} split; fairness gate: {card["metrics"]["fairness_gate"]}

## Evaluation data
{card["evaluation_data"]["source"]}, {card["evaluation_data"]["split"]} split, {card["evaluation_data"]["num_samples"]} examples; data sha256 {card["evaluation_data"]["data_sha256"]}

## Training data
{data["source"]}, splits {data["splits"]}, {data["modality"]} data, licence {licence["data"] or "(not stated)"}

Privacy: {_summary(data["privacy"])}

Training: {train["strategy"]} ZeRO-{train["zero_stage"]}, {train["workers"]} worker(s), {train["precision"]}, {train["epochs_run"]}/{train["epochs_planned"]} epochs, {train["train_time_s"]} s training{_throughput(train)}

Adapter: {_adapter(train["adapter"])}

## Quantitative analyses
{_metric_table(quant["overall"], quant["per_group"])}

{_fairness(card["fairness"])}

Fairness mitigation: {_summary(card["fairness"]["mitigation"])}

Explanations: {_summary(card["explanations"])}

Tuning: {_summary(card["tuning"])}

## Ethical considerations
{_bullets(card["ethical_considerations"])}

## Caveats and recommendations
{_bullets(card["caveats_and_recommendations"])}
"""  # noqa: E501
