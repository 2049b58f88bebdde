"""`JobSpec`: the whole job, one section per stage."""

import copy
import difflib
from typing import Any

from pydantic import Field, ValidationError, model_validator

from steward.spec.base import MAX_SEED, Section, raise_problems, set_dotted, shorten
from steward.spec.bench import MAX_CELLS, BenchSpec
from steward.spec.data import DataSpec
from steward.spec.distributed import DistributedSpec
from steward.spec.evaluate import EvaluateSpec
from steward.spec.explain import ExplainSpec, baseline_problem
from steward.spec.fairness import fairness_problems
from steward.spec.governance import GovernanceSpec
from steward.spec.model import ModelSpec, TransformerParams
from steward.spec.monitor import MonitorSpec
from steward.spec.privacy import PrivacySpec, privacy_problems
from steward.spec.rollout import rollout_problems
from steward.spec.serve import ServeSpec
from steward.spec.tracking import TrackingSpec
from steward.spec.train import TrainSpec, train_problems
from steward.spec.tune import TuneSpec, tune_problems

UNTUNABLE = ("name", "description", "output_dir", "tune", "bench")


class JobSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Run name: letters, digits, _ . -")
    description: str = Field("", description="What this job is for.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seeds data splits, shuffling and initialisation.")
    output_dir: str = Field(
        "runs",
        description="Folder that run folders are created under, or cluster storage: s3://bucket/path, "
        "gs://bucket/path (add ?endpoint_override=host:port&scheme=http for an S3-compatible server).",
    )
    data: DataSpec = Field(description="Data source, columns, splits and batching.")
    model: ModelSpec = Field(description="Model family, task and parameters.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation and checkpoints.")
    distributed: DistributedSpec = Field(default_factory=DistributedSpec, description="Workers and DeepSpeed.")
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec, description="Evaluation after training.")
    tune: TuneSpec | None = Field(None, description="A Ray Tune sweep over fields of this spec.")
    serve: ServeSpec | None = Field(None, description="Deploy the trained model on Ray Serve.")
    explain: ExplainSpec | None = Field(None, description="Explanations: Integrated Gradients, permutation importance.")
    monitor: MonitorSpec | None = Field(None, description="Bias and drift monitoring of the served model.")
    privacy: PrivacySpec | None = Field(None, description="PII masking and k-anonymity of the training data.")
    governance: GovernanceSpec | None = Field(
        None, description="Owners, intended use, risk level and licences: feeds the model card and policy checks."
    )
    bench: BenchSpec | None = Field(None, description="A benchmark matrix over fields of this spec (`steward bench`).")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Experiment tracking on MLflow.")

    @model_validator(mode="after")
    def _cross_section(self) -> "JobSpec":
        problems: dict[str, str] = {}
        lm = self.model.task == "causal_lm"
        dist = self.distributed
        problems |= train_problems(self.train, self.model.family, dist.strategy, dist.use_gpu)
        if not lm and self.data.label_column is None and self.data.scheme != "builtin":
            problems["data.label_column"] = "required for classification on file: and hf: sources"
        not_lm = [m for m in self.evaluate.metrics if m not in ("loss", "perplexity")]
        if lm and not_lm:
            problems["evaluate.metrics"] = f"{not_lm} need a classification task; use loss and perplexity"
        if not lm and "perplexity" in self.evaluate.metrics:
            problems["evaluate.metrics"] = "perplexity needs task: causal_lm"
        if self.train.include_validation and "validation" not in self.data.splits:
            problems["train.include_validation"] = "needs a validation split in data.splits"
        params = self.model.params
        if lm and isinstance(params, TransformerParams) and not params.pretrained and params.model_type == "bert":
            problems["model.params.model_type"] = "causal_lm needs a decoder architecture such as gpt2"
        if self.monitor is not None and self.monitor.bias is not None and lm:
            problems["monitor.bias"] = (
                "live bias needs predicted classes; a causal_lm's groups are judged in evaluation"
            )
        if self.monitor is not None and self.monitor.performance is not None and lm:
            problems["monitor.performance"] = "judges late labels of predicted classes; remove it for causal_lm"
        if self.monitor is not None and self.monitor.leaks is not None and not lm:
            problems["monitor.leaks"] = "judges generated text, which needs task: causal_lm; remove monitor.leaks"
        if self.serve is not None and self.serve.generation is not None and not lm:
            problems["serve.generation"] = "bounds generation, which needs task: causal_lm; remove serve.generation"
        if self.serve is not None and self.serve.output_pii != "allow" and not lm:
            problems["serve.output_pii"] = "applies to generated text, which needs task: causal_lm; remove it"
        problems |= fairness_problems(self) | privacy_problems(self)
        problems |= rollout_problems(self.serve.rollout if self.serve else None, self.monitor, lm)
        if self.explain is not None:
            problems |= self._explain_problems()
        found: dict[str | tuple, str] = {key: value for key, value in problems.items()}
        found.update(self._tune_problems() if self.tune else {})
        found.update(self._bench_problems() if self.bench else {})
        raise_problems(self, found)
        return self

    def _explain_problems(self) -> dict[str, str]:
        assert self.explain is not None
        if self.model.task != "classification":
            return {"explain": "explanations need a classification task; remove the explain section for causal_lm"}
        problem = baseline_problem(self.explain.baseline, self.model.family)
        return {"explain.baseline": problem} if problem else {}

    def reported_metrics(self) -> set[str]:
        """What the training loop reports every epoch (validation metrics need a validation split)."""
        reported = {"epoch", "step", "train_loss", "lr", "samples_per_s", "epoch_seconds", "memory_added_mb"}
        if "validation" in self.data.splits and not self.train.include_validation:
            lm = self.model.task == "causal_lm"
            reported |= {"val_loss", "val_perplexity"} if lm else {"val_loss", "val_accuracy"}
        return reported

    def _tune_problems(self) -> dict[str | tuple, str]:
        assert self.tune is not None
        base = self.model_dump(mode="json", exclude={"tune", "bench"})
        problems: dict[str | tuple, str] = dict(tune_problems(self.tune, base, self.reported_metrics()))
        for path, dist in self.tune.search_space.items():
            problem = _path_problem(base, path) or _candidate_problem(base, path, dist.candidates)
            if problem:
                problems[("tune", "search_space", path)] = problem
        return problems

    def _bench_problems(self) -> dict[str | tuple, str]:
        """Every matrix path names a field, and every cell is a valid spec: refused before anything runs."""
        assert self.bench is not None
        base = self.model_dump(mode="json", exclude={"tune", "bench"})
        problems: dict[str | tuple, str] = {}
        for path in self.bench.matrix:
            if problem := _path_problem(base, path):
                problems[("bench", "matrix", path)] = problem
        if self.bench.size > MAX_CELLS:
            problems[("bench", "matrix")] = (
                f"{self.bench.size} cells; at most {MAX_CELLS}: list a subset in bench.cells"
            )
        if problems:
            return problems
        cells = self.bench.combinations()
        if self.serve is None and self.bench.serving:
            problems[("bench", "measure")] = "serve measures need a serve section; add one or measure training"
        for i, cell in enumerate(cells):
            if problem := _variant_problem(base, cell):
                problems[("bench", "cells" if self.bench.cells else "matrix", str(i))] = f"cell {cell}: {problem}"
        return problems


def _variant_problem(spec: dict, values: dict[str, Any]) -> str | None:
    """Why the spec with these values at these dotted paths is invalid (`field: message`), or None."""
    variant = copy.deepcopy(spec)
    for path, value in values.items():
        set_dotted(variant, path, value)
    try:
        JobSpec.model_validate(variant)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p not in ("cnn", "lstm", "transformer"))  # union tags
        return f"{where}: {first['msg'].removeprefix('Value error, ')}"
    return None


def _path_problem(spec: dict, path: str) -> str | None:
    """Why `path` names no field of this spec, or None."""
    if path.split(".")[0] in UNTUNABLE:
        return f"{path.split('.')[0]} cannot be varied"
    node: Any = spec
    for depth, part in enumerate(path.split(".")):
        if not isinstance(node, dict) or part not in node:
            known = list(node) if isinstance(node, dict) else []
            close = difflib.get_close_matches(part, known, n=1)
            where = ".".join(path.split(".")[:depth]) or "the spec"
            hint = f"did you mean `{close[0]}`?" if close else f"{where} has {', '.join(known) or 'no fields'}"
            return f"no field `{part}` in {where}; {hint}"
        node = node[part]
    return None


def _candidate_problem(spec: dict, path: str, values: list[Any]) -> str | None:
    """Validate the spec with each bounding value at `path`, so a bad range fails before any trial starts."""
    for value in values:
        if problem := _variant_problem(spec, {path: value}):
            return f"value {shorten(repr(value))} makes the spec invalid: {shorten(problem, 400)}"
    return None
