"""Evaluate a run's consolidated model on a split of the spec's data, overall and per group."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch import nn

from steward.data import DataInfo, load_splits
from steward.data.privacy import REPORT_FILE
from steward.errors import StewardError
from steward.evaluate.metrics import compute_metrics
from steward.evaluate.predict import predict
from steward.evaluate.profile import capture_reference, save_training_ngrams
from steward.evaluate.report import fairness_result, fit_thresholds, perplexity_fairness_result
from steward.evaluate.thresholds import Thresholds, adjust_logits, load_thresholds
from steward.models import load_model
from steward.spec import JobSpec


def load_servable(model_dir: Path) -> tuple[nn.Module, DataInfo]:
    """The consolidated model and its data info, with the tokenizer path made absolute."""
    model, _, info = load_model(model_dir)
    if info.tokenizer_dir and not Path(info.tokenizer_dir).is_absolute():
        info = replace(info, tokenizer_dir=str((Path(model_dir) / info.tokenizer_dir).resolve()))
    return model, info


def evaluate(
    model: nn.Module,
    info: DataInfo,
    spec: JobSpec,
    split: str | None = None,
    batch_size: int = 256,
    thresholds: Thresholds | None = None,
) -> dict:
    """Metrics of `model` on `split` of the spec's data (default: evaluate.split, else validation), per group too.

    With group columns, also the fairness report (per-group tables and fairness metrics: rates for a classifier,
    perplexity for a language model; the gate); with `thresholds`, predictions are the per-group thresholded
    decisions (losses stay the model's).
    """
    splits = load_splits(spec, info)
    split = split or (spec.evaluate.split if spec.evaluate.split in splits else "validation")
    if split not in splits:
        raise StewardError(f"evaluate.split: the data has no {split!r} split; it has {', '.join(splits)}")
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
    if spec.data.group_columns:
        for name in spec.evaluate.fairness.splits:
            if name in splits and name not in predicted:
                predicted[name] = predict(model, splits[name], task, batch_size)
        if task == "classification":
            result |= fairness_result(spec, info, splits, predicted, split, thresholds)
        else:
            result |= perplexity_fairness_result(spec, splits, predicted, split)
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


def evaluate_run(run_dir: Path, spec: JobSpec) -> dict:
    """After training: evaluate the run's consolidated model into metrics.json and save the monitor's reference
    profile beside the model."""
    model, info = load_servable(run_dir / "model")
    result = evaluate(model, info, spec, thresholds=run_thresholds(model, info, spec, run_dir / "model"))
    write_metrics(run_dir, result)
    capture_reference(model, info, spec, run_dir / "model")
    save_training_ngrams(info, spec, run_dir / "model")
    return result


def write_metrics(run_dir: Path, result: dict) -> Path:
    """Write metrics.json; adds the privacy report (counts only) to `result` when the run's data was masked."""
    privacy = run_dir / REPORT_FILE
    if privacy.exists():
        result["privacy"] = json.loads(privacy.read_text())
    path = run_dir / "metrics.json"
    path.write_text(json.dumps(result, indent=2))
    return path
