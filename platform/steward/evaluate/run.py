"""Evaluate a run's consolidated model on a split of the spec's data, overall and per group."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from steward.data import DataInfo, Split, load_splits
from steward.data.privacy import REPORT_FILE
from steward.evaluate.metrics import compute_metrics
from steward.evaluate.profile import capture_reference
from steward.evaluate.report import fairness_result, fit_thresholds
from steward.evaluate.thresholds import Thresholds, adjust_logits, load_thresholds
from steward.models import build_model, load_model, task_loss
from steward.runs import read_spec
from steward.spec import JobSpec
from steward.train.checkpoint import STATE_FILE, consolidate_checkpoint


def load_servable(model_dir: Path) -> tuple[nn.Module, DataInfo]:
    """The consolidated model and its data info, with the tokenizer path made absolute."""
    model, _, info = load_model(model_dir)
    if info.tokenizer_dir and not Path(info.tokenizer_dir).is_absolute():
        info = replace(info, tokenizer_dir=str((Path(model_dir) / info.tokenizer_dir).resolve()))
    return model, info


@torch.no_grad()
def predict(model: nn.Module, data: Split, task: str, batch_size: int = 256) -> tuple[np.ndarray, ...]:
    """Labels, logits (classification; empty for language models) and per-row losses of one split."""
    labels, logits, losses = [], [], []
    for batch in data.batches(batch_size):
        out = model(batch["inputs"], batch.get("attention_mask")).float()
        rows = [task_loss(task, out[i : i + 1], batch["labels"][i : i + 1]) for i in range(len(out))]
        losses.append(torch.stack(rows))
        labels.append(batch["labels"])
        logits.append(out if task == "classification" else out[:, :0, 0])  # LM logits are not kept: too big
    return tuple(torch.cat(t).numpy() for t in (labels, logits, losses))


def evaluate(
    model: nn.Module,
    info: DataInfo,
    spec: JobSpec,
    split: str | None = None,
    batch_size: int = 256,
    thresholds: Thresholds | None = None,
) -> dict:
    """Metrics of `model` on `split` of the spec's data (default: evaluate.split, else validation), per group too.

    With group columns on a classification task, also the fairness report (per-group tables, fairness metrics,
    the gate); with `thresholds`, predictions are the per-group thresholded decisions (losses stay the model's).
    """
    splits = load_splits(spec, info)
    split = split or (spec.evaluate.split if spec.evaluate.split in splits else "validation")
    if split not in splits:
        raise ValueError(f"evaluate.split: the data has no {split!r} split; it has {', '.join(splits)}")
    data, task = splits[split], spec.model.task
    predicted = {split: predict(model, data, task, batch_size)}
    y, z, loss = predicted[split]
    if thresholds is not None:
        z = adjust_logits(z, data.groups[thresholds.group_column], thresholds)
    result = {"split": split, "num_samples": len(data), "overall": compute_metrics(spec.evaluate.metrics, y, z, loss)}
    if spec.evaluate.per_group and data.groups:
        result["groups"] = {
            column: {
                value: {
                    "count": int(mask.sum()),
                    **compute_metrics(spec.evaluate.metrics, y[mask], z[mask], loss[mask]),
                }
                for value in sorted(set(values))
                for mask in [np.array(values) == value]
            }
            for column, values in data.groups.items()
        }
    if task == "classification" and spec.data.group_columns:
        for name in spec.evaluate.fairness.splits:
            if name in splits and name not in predicted:
                predicted[name] = predict(model, splits[name], task, batch_size)
        result |= fairness_result(spec, info, splits, predicted, split, thresholds)
    return result


def evaluate_model(model_dir: Path, spec: JobSpec, split: str | None = None) -> dict:
    """Evaluate the consolidated model in `model_dir` (no DeepSpeed involved).

    With train.mitigation.method thresholds, the model's thresholds.json is used; the first evaluation after
    training chooses the thresholds on the validation split and writes that file.
    """
    model, info = load_servable(model_dir)
    return evaluate(model, info, spec, split, thresholds=run_thresholds(model, info, spec, model_dir))


def run_thresholds(model: nn.Module, info: DataInfo, spec: JobSpec, model_dir: Path) -> Thresholds | None:
    """The model's per-group thresholds (train.mitigation: thresholds), chosen on validation and saved if new."""
    mitigation = spec.train.mitigation
    if mitigation is None or mitigation.method != "thresholds":
        return None
    return load_thresholds(model_dir) or fit_thresholds(model, info, spec, model_dir)


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
        model.load_state_dict(consolidate_checkpoint(target, spec.distributed.zero_stage))
        return evaluate(model.eval(), info, spec, split), run_dir
    raise ValueError(f"{target}: not a run folder, a model folder (model.json) or a checkpoint ({STATE_FILE})")


def evaluate_run(run_dir: Path, spec: JobSpec) -> dict:
    """After training: evaluate the run's consolidated model into metrics.json and save the monitor's reference
    profile beside the model."""
    model, info = load_servable(run_dir / "model")
    result = evaluate(model, info, spec, thresholds=run_thresholds(model, info, spec, run_dir / "model"))
    write_metrics(run_dir, result)
    capture_reference(model, info, spec, run_dir / "model")
    return result


def write_metrics(run_dir: Path, result: dict) -> Path:
    """Write metrics.json; adds the privacy report (counts only) to `result` when the run's data was masked."""
    privacy = run_dir / REPORT_FILE
    if privacy.exists():
        result["privacy"] = json.loads(privacy.read_text())
    path = run_dir / "metrics.json"
    path.write_text(json.dumps(result, indent=2))
    return path
