"""The audit events of a run's life (started, finished, failed, sweep finished), with the hashes that tie them
to the exact spec, data and model. The CLI calls these around training and sweeps."""

import json
from pathlib import Path
from typing import Any

from steward.govern import audit
from steward.govern.card import CARD_JSON


def record_run(event: str, run_dir: Path, output_dir: str | Path, **extra: Any) -> dict[str, Any]:
    """Record `event` for the run folder; a finished run's event carries its data and model hashes.

    When the run's metrics say its fairness gate failed, `fairness_gate.failed` is recorded after it. The run
    folder pins the last event recorded (audit.PIN), so a log cut back before it fails `steward audit verify`.
    """
    fields = audit.run_fields(run_dir)
    card_file = Path(run_dir) / CARD_JSON
    if event in ("run.finished", "sweep.finished") and card_file.exists():
        card = json.loads(card_file.read_text())
        fields |= {
            "data_sha256": card["training_data"]["data_sha256"],
            "model_sha256": card["model_details"]["model_sha256"],
            "fairness_gate": card["metrics"]["fairness_gate"],
            "overall": card["quantitative_analyses"]["overall"],
        }
    log = audit.log_path(output_dir)
    entry = audit.record(event, log=log, **fields, **extra)
    if fields.get("fairness_gate") == "failed":
        audit.pin(run_dir, audit.record("fairness_gate.failed", log=log, **audit.run_fields(run_dir)), log)
    else:
        audit.pin(run_dir, entry, log)
    return entry
