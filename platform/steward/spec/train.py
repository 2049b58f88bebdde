"""The `train` section: optimisation, precision, early stopping, checkpoints."""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from steward.spec.base import MAX_COUNT, Section
from steward.spec.fairness import MitigationSpec

# torch's AdamW refuses a beta outside [0, 1).
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class OptimizerSpec(Section):
    name: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Decoupled weight decay (AdamW) or L2 (SGD).")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")


class SchedulerSpec(Section):
    name: Literal["constant", "linear", "cosine"] = Field("constant", description="Decay after warm-up.")
    warmup_steps: int = Field(
        0, ge=0, le=MAX_COUNT, description="Linear warm-up from 0 to lr over this many optimizer steps."
    )


class EarlyStoppingSpec(Section):
    metric: str = Field("val_loss", description="Validation metric watched, e.g. val_loss or val_accuracy.")
    mode: Literal["min", "max"] = Field("min", description="Whether smaller or larger is better.")
    patience: int = Field(3, ge=1, le=100_000, description="Epochs without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, le=1e12, description="Smallest change that counts as an improvement.")


class CheckpointSpec(Section):
    every_epochs: int = Field(
        1, ge=1, le=100_000, description="Save a checkpoint every N epochs (and always at the end)."
    )
    keep: int = Field(2, ge=1, le=100_000, description="How many checkpoints to keep.")


class TrainSpec(Section):
    epochs: int = Field(5, ge=1, le=100_000, description="Passes over the training split.")
    max_steps: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Stop after this many optimizer steps (caps epochs)."
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer and its parameters.")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="Learning-rate schedule.")
    grad_clip: float | None = Field(1.0, gt=0.0, le=1e12, description="Clip the global gradient norm to this value.")
    grad_accum_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="fp32, bf16, or fp16 (with dynamic loss scaling); fp16 under DeepSpeed needs use_gpu.",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Transformers: recompute each layer's activations in the backward pass instead of keeping "
        "them: less memory for one more forward pass.",
    )
    early_stopping: EarlyStoppingSpec | None = Field(None, description="Stop when a validation metric stalls.")
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="Checkpoint frequency and retention."
    )
    log_every_steps: int = Field(50, ge=1, le=MAX_COUNT, description="Report training loss every N optimizer steps.")
    include_validation: bool = Field(
        False, description="Train on train + validation (a retrain after a sweep); no validation metrics then."
    )
    mitigation: MitigationSpec | None = Field(
        None, description="Bias mitigation for evaluate.fairness.group_column: resample, reweigh or thresholds."
    )

    @model_validator(mode="after")
    def _early_stopping_metric_is_validation(self) -> "TrainSpec":
        if self.early_stopping and not self.early_stopping.metric.startswith("val_"):
            metric = self.early_stopping.metric
            raise ValueError(f"early_stopping.metric must be a validation metric such as val_loss, not {metric!r}")
        if self.early_stopping and self.include_validation:
            raise ValueError("early_stopping watches the validation split, which include_validation trains on")
        return self


def train_problems(train: TrainSpec, family: str, strategy: str, use_gpu: bool) -> dict[str, str]:
    """Settings of `train` that the model family or the distributed strategy cannot honour, by field."""
    problems = {}
    # DeepSpeed's CPU accelerator offers fp16 only where oneDNN has fp16 kernels; DDP autocasts with a GradScaler.
    if train.precision == "fp16" and strategy == "deepspeed" and not use_gpu:
        problems["train.precision"] = (
            "fp16 under DeepSpeed needs distributed.use_gpu: true; on CPU use bf16, or strategy: ddp"
        )
    if train.activation_checkpointing and family != "transformer":
        problems["train.activation_checkpointing"] = (
            f"recomputes Transformer layers, which a {family} has none of; set it to false or use family: transformer"
        )
    return problems
