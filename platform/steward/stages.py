"""What each stage of a run does to its run folder, composed from the layers below: train (fit, curves,
evaluation, card), keep a sweep's model, evaluate a saved model or checkpoint.

The stages know nothing of a run's life (state, audit, publishing): steward.pipeline owns that and calls them in
order. A stage that needs Ray joins the one at `address` through steward.ray_env when it first needs it.
"""

import json
from pathlib import Path

from steward import storage
from steward.data import DataInfo
from steward.errors import StewardError
from steward.evaluate.run import evaluate, evaluate_model, evaluate_run
from steward.govern.card import write_card
from steward.models import build_model, load_trained_state
from steward.runs import read_spec, run_uri
from steward.spec import JobSpec
from steward.train.checkpoint import STATE_FILE, consolidate_checkpoint
from steward.train.curves import plot_history
from steward.train.launch import fit
from steward.train.loop import HISTORY
from steward.tune.finish import SweepResult, copy_best_trial, retrain_spec


def train_model(spec: JobSpec, run_dir: Path, address: str | None = None) -> dict:
    """Train the spec into run_dir (new or resumed), then evaluate the consolidated model and write the card.

    For a URI output_dir, run_dir is the local staging folder: what rank 0 wrote (history.jsonl, model/) is
    fetched back from the URI before evaluating. Returns metrics.json.
    """
    fit(spec, run_dir, address)
    uri = run_uri(spec, run_dir)
    if uri:
        storage.download(uri, run_dir, [HISTORY, "model"])
    plot_history(run_dir / HISTORY, run_dir / "curves.png")
    return evaluate_and_card(spec, run_dir)


def keep_sweep_model(spec: JobSpec, sweep: SweepResult, run_dir: Path, address: str | None = None) -> dict:
    """The sweep's model as tune.on_finish says: the best trial's own, or its config retrained on train +
    validation. Returns its metrics.json; the card names the sweep that chose the model."""
    assert spec.tune is not None
    if spec.tune.on_finish == "retrain_best":
        result = train_model(retrain_spec(sweep), run_dir, address)
    else:
        copy_best_trial(sweep, run_dir)
        plot_history(run_dir / HISTORY, run_dir / "curves.png")
        result = evaluate_run(run_dir, sweep.best_spec)
    write_card(run_dir, sweep.best_spec)
    return result


def evaluate_and_card(spec: JobSpec, run_dir: Path) -> dict:
    """metrics.json and the monitor's reference beside the model, then the model card."""
    result = evaluate_run(run_dir, spec)
    write_card(run_dir, spec)
    return result


def evaluate_target(target: Path, spec: JobSpec | None = None, split: str | None = None) -> tuple[dict, Path]:
    """Evaluate a run folder's model, a model folder, or one of a run's checkpoints; returns (metrics, run folder).

    Without `spec`, the run's own resolved spec says which data to use.
    """
    if (target / "model.json").exists():  # a model folder
        return evaluate_model(target, spec or read_spec(target.parent), split), target.parent
    if (target / "model" / "model.json").exists():  # a run folder
        return evaluate_model(target / "model", spec or read_spec(target), split), target
    if (target / STATE_FILE).exists():  # a checkpoint: runs/<name>/<id>/train/checkpoint_*
        run_dir = target.parent.parent
        spec = spec or read_spec(run_dir)
        info = DataInfo.from_dict(json.loads((run_dir / "data_info.json").read_text()))
        model = build_model(spec.model, info)
        load_trained_state(model, consolidate_checkpoint(target, spec.distributed.zero_stage))
        return evaluate(model.eval(), info, spec, split), run_dir
    raise StewardError(f"{target}: not a run folder, a model folder (model.json) or a checkpoint ({STATE_FILE})")
