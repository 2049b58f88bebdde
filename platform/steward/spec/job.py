"""`JobSpec`: the whole job, one section per stage."""

from typing import Any

from pydantic import Field, field_validator, model_validator

from steward.spec.base import Section, raise_problems
from steward.spec.data import DataSpec
from steward.spec.distributed import DistributedSpec
from steward.spec.evaluate import EvaluateSpec
from steward.spec.model import ModelSpec, TransformerParams
from steward.spec.serve import ServeSpec
from steward.spec.train import TrainSpec

RESERVED = ("tune", "monitor", "privacy", "governance")


class JobSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Run name: letters, digits, _ . -")
    description: str = Field("", description="What this job is for.")
    seed: int = Field(0, ge=0, description="Seeds data splits, shuffling and initialisation.")
    output_dir: str = Field("runs", description="Folder that run folders are created under.")
    data: DataSpec = Field(description="Data source, columns, splits and batching.")
    model: ModelSpec = Field(description="Model family, task and parameters.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation and checkpoints.")
    distributed: DistributedSpec = Field(default_factory=DistributedSpec, description="Workers and DeepSpeed.")
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec, description="Evaluation after training.")
    tune: Any = Field(None, description="Reserved: hyperparameter sweeps (not supported yet).")
    serve: ServeSpec | None = Field(None, description="Deploy the trained model on Ray Serve.")
    monitor: Any = Field(None, description="Reserved: bias and drift monitoring (not supported yet).")
    privacy: Any = Field(None, description="Reserved: PII masking (not supported yet).")
    governance: Any = Field(None, description="Reserved: model cards and policies (not supported yet).")

    @field_validator(*RESERVED)
    @classmethod
    def _not_yet(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("this section is not supported yet in this version of steward; remove it")
        return value

    @model_validator(mode="after")
    def _cross_section(self) -> "JobSpec":
        problems = {}
        lm = self.model.task == "causal_lm"
        if self.train.precision == "fp16" and not self.distributed.use_gpu:
            problems["train.precision"] = "fp16 needs distributed.use_gpu: true; use bf16 or fp32 on CPU"
        if lm and self.data.group_columns:
            problems["data.group_columns"] = "per-group evaluation needs a classification task; remove it"
        if not lm and self.data.label_column is None and self.data.scheme != "builtin":
            problems["data.label_column"] = "required for classification on file: and hf: sources"
        not_lm = [m for m in self.evaluate.metrics if m not in ("loss", "perplexity")]
        if lm and not_lm:
            problems["evaluate.metrics"] = f"{not_lm} need a classification task; use loss and perplexity"
        if not lm and "perplexity" in self.evaluate.metrics:
            problems["evaluate.metrics"] = "perplexity needs task: causal_lm"
        params = self.model.params
        if lm and isinstance(params, TransformerParams) and not params.pretrained and params.model_type == "bert":
            problems["model.params.model_type"] = "causal_lm needs a decoder architecture such as gpt2"
        if self.serve is not None and lm:
            problems["serve"] = "serving supports classification models; remove the serve section for causal_lm"
        raise_problems(self, problems)
        return self
