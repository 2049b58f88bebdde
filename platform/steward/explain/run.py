"""`steward explain RUN`: explain instances with a run's model and write the artifacts into the run folder."""

import time
from pathlib import Path
from typing import Any

import numpy as np

import steward.explain.report as report
from steward.data import encode_instances, load_splits
from steward.errors import StewardError
from steward.evaluate.run import load_servable
from steward.explain.explainer import explain_instances
from steward.explain.permutation import as_steps_by_features, model_scorer, permutation_importance
from steward.runs import read_spec
from steward.spec import JobSpec
from steward.spec.explain import ExplainSpec, baseline_problem


def explain_run(
    run_dir: Path,
    instances: list[Any] | None,
    *,
    target: str | None = None,
    n_steps: int | None = None,
    permutation: bool = False,
) -> tuple[Path, list[Path]]:
    """Write RUN/explanations/<timestamp>/: attributions.json (+ heatmap.png or tokens.html), permutation.json.

    Settings come from the run's own spec (its `explain` section, or the defaults). Returns (folder, files).
    Raises StewardError for a folder that is not a finished run, nothing to do, or settings that do not fit.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "model" / "model.json").exists():
        raise StewardError(f"{run_dir}: not a finished run folder (no model/model.json); pass runs/<name>/<run-id>")
    if not instances and not permutation:
        raise StewardError("nothing to explain: pass --input with instances, --permutation, or both")
    if n_steps is not None and n_steps < 2:
        raise StewardError(f"--steps: Integrated Gradients needs at least 2 steps, got {n_steps}")
    spec = read_spec(run_dir)
    cfg = spec.explain or ExplainSpec()
    model, info = load_servable(run_dir / "model")
    problem = baseline_problem(cfg.baseline, spec.model.family, info.modality)
    if problem:
        raise StewardError(f"explain.baseline: {problem}")
    folder = run_dir / "explanations" / (time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10_000:04d}")
    folder.mkdir(parents=True)
    files = []
    if instances:
        records, baseline = explain_instances(
            model, info, cfg, instances, spec.data.max_length, target=target, n_steps=n_steps
        )
        settings = {"baseline": baseline, "n_steps": n_steps or cfg.n_steps, "output": cfg.output}
        payload = _payload(run_dir, info.modality, settings, records)
        files.append(report.write_json(folder / report.ATTRIBUTIONS, payload))
        if info.modality == "image":
            images = list(encode_instances(instances, info, 0)[0].numpy())
            files.append(report.write_heatmap(folder / report.HEATMAP, images, records))
        elif info.modality == "text":
            files.append(report.write_token_html(folder / report.TOKENS, records))
    if permutation:
        files.append(report.write_json(folder / report.PERMUTATION, run_permutation(model, info, spec, cfg)))
    return folder, files


def _payload(run_dir: Path, modality: str, settings: dict, records: list[dict]) -> dict[str, Any]:
    return {
        "run": str(run_dir),
        "method": "integrated_gradients",
        "modality": modality,
        **settings,
        "max_abs_delta": max(abs(r["delta"]) for r in records),
        "all_converged": all(r["converged"] for r in records),
        "explanations": records,
    }


def run_permutation(model: Any, info: Any, spec: JobSpec, cfg: ExplainSpec) -> dict[str, Any]:
    """Permutation importance of features and time steps on the first permutation.max_rows validation rows."""
    splits = load_splits(spec, info)
    if "validation" not in splits:
        raise StewardError("permutation importance uses the validation split; add one to data.splits")
    data, settings = splits["validation"], cfg.permutation
    inputs = as_steps_by_features(data.inputs[: settings.max_rows], info.modality)
    labels = data.labels[: settings.max_rows]
    score = model_scorer(model, labels, settings.metric)
    out: dict[str, Any] = {"split": "validation", "rows": len(inputs), "metric": settings.metric}
    out |= {"repeats": settings.repeats, "score": "accuracy" if settings.metric == "accuracy" else "-loss"}
    out["features"] = permutation_importance(score, inputs, 2, settings.repeats, spec.seed)
    if inputs.shape[1] > 1:  # tabular rows are a single step: nothing to shuffle over time
        out["steps"] = permutation_importance(score, inputs, 1, settings.repeats, spec.seed)
    out["top_feature"] = int(np.argmax([r["mean"] for r in out["features"]["importances"]]))
    return out
