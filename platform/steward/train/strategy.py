"""Wrap a plain model for distributed training: PyTorch DDP or a DeepSpeed engine (ZeRO 0-3, offload).

Both wrappers expose the same small surface, so the training loop never branches on the strategy.
"""

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steward.data import DataInfo
from steward.errors import StewardError
from steward.models import build_model, load_trained_state
from steward.spec import JobSpec

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class StrategyError(StewardError):
    """A distributed setting that DeepSpeed or the cluster refuses."""


# DeepSpeed sizes its communication buckets and ZeRO-3's prefetch for GPUs (5e8 elements: 2 GB of fp32 for every
# bucket that fills up). On CPU they come out of the RAM the workers share, so each holds 2e7 elements (80 MB of
# fp32) and ZeRO-3 keeps at most 1e8 gathered parameters live and steps its optimizer 1e8 parameters at a time.
CPU_BUCKETS = {
    "reduce_bucket_size": 20_000_000,
    "allgather_bucket_size": 20_000_000,
    "stage3_prefetch_bucket_size": 10_000_000,
    "stage3_max_live_parameters": 100_000_000,
    "stage3_max_reuse_distance": 100_000_000,
    "sub_group_size": 100_000_000,
}


def deepspeed_config(spec: JobSpec) -> dict[str, Any]:
    """The DeepSpeed config for this spec: batch sizes, precision, ZeRO, offload, clipping, optimizer."""
    train, dist, opt = spec.train, spec.distributed, spec.train.optimizer
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": dist.offload_optimizer}
    if dist.offload_params != "none":
        zero["offload_param"] = {"device": dist.offload_params}
    params: dict[str, Any] = {"lr": opt.lr, "weight_decay": opt.weight_decay}
    params.update({"betas": list(opt.betas)} if opt.name == "adamw" else {"momentum": opt.momentum})
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.data.batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": spec.data.batch_size * train.grad_accum_steps * dist.num_workers,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW" if opt.name == "adamw" else "SGD", "params": params},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not dist.use_gpu:
        zero.update(CPU_BUCKETS)
    if train.precision != "fp32" and spec.model.family == "cnn":
        # DeepSpeed >= 0.19 keeps buffers fp32, but batch_norm wants its running statistics in the input's dtype.
        config["data_types"] = {"buffer_dtype": train.precision}
    if opt.name == "sgd":  # torch's SGD: ZeRO shards its state like Adam's, but DeepSpeed wants an explicit opt-in
        config["zero_allow_untested_optimizer"] = True
    # Always explicit: DeepSpeed's own default is 1.0, so leaving it out would clip when the spec says not to.
    config["gradient_clipping"] = train.grad_clip or 0.0
    if _norm_is_unused(spec):
        # ZeRO-1/2 otherwise compute the global gradient norm every step (a per-tensor norm loop and a blocking
        # all-reduce) only to clip with it; without clipping nothing reads it, and on small models it is a
        # noticeable share of each step.
        zero["compute_grad_norm"] = False
    return _merge(config, dist.deepspeed_overrides)


def _norm_is_unused(spec: JobSpec) -> bool:
    """True when DeepSpeed 0.19's ZeRO-1/2 may skip the gradient norm (its own conditions, checked at initialize)."""
    dist, train = spec.distributed, spec.train
    zero_overrides = dist.deepspeed_overrides.get("zero_optimization", {})
    return (
        dist.zero_stage in (1, 2)
        and not train.grad_clip
        and dist.offload_optimizer == "none"
        # bf16 under ZeRO-1 may select DeepSpeed's BF16 optimizer, which needs the norm; ZenFlow needs it too.
        and not (train.precision == "bf16" and dist.zero_stage == 1)
        and "zenflow" not in zero_overrides
    )


def validate_deepspeed(spec: JobSpec) -> None:
    """Let DeepSpeed itself check the config before any worker starts; re-raise its complaint clearly."""
    if spec.distributed.strategy != "deepspeed":
        return
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if spec.distributed.use_gpu else "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    # Outside a process group DeepSpeed assumes one rank, so check the per-rank share of the global batch.
    config, workers = deepspeed_config(spec), spec.distributed.num_workers
    try:
        if config["train_batch_size"] % workers:
            raise ValueError(f"train_batch_size {config['train_batch_size']} is not divisible by {workers} workers")
        DeepSpeedConfig({**config, "train_batch_size": config["train_batch_size"] // workers})
    except Exception as err:  # DeepSpeed raises AssertionError, pydantic errors and ValueError alike
        detail = " ".join(str(err).split()).replace("world_size", "world_size (per worker)")
        raise StrategyError(f"distributed.deepspeed_overrides: DeepSpeed rejects the config: {detail}") from None


def lr_lambda(spec: JobSpec, total_steps: int):
    """Linear warm-up, then constant, linear or cosine decay to zero at total_steps."""
    warmup, kind = spec.train.scheduler.warmup_steps, spec.train.scheduler.name

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def zero_init_builds(spec: JobSpec) -> bool:
    """Whether `build_model_for` creates the model partitioned: a Transformer from its config under ZeRO-3.
    Pretrained and adapted models are built whole and partitioned by the engine."""
    dist, model = spec.distributed, spec.model
    pretrained = getattr(model.params, "pretrained", None)
    zero3 = dist.strategy == "deepspeed" and dist.zero_stage == 3
    return zero3 and model.family == "transformer" and not pretrained and model.adapter is None


def build_model_for(spec: JobSpec, info: DataInfo) -> nn.Module:
    """The spec's model for this worker. Under ZeRO-3 a Transformer built from its config is created partitioned
    (deepspeed.zero.Init): each layer's parameters are split over the ranks as soon as the layer exists, so no rank
    ever holds the whole model."""
    model = spec.model
    if not zero_init_builds(spec):
        return build_model(model, info)
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    if torch.distributed.is_initialized():  # Ray Train's process group: DeepSpeed's config check counts every rank
        deepspeed.init_distributed()
    # Transformers opens zero.Init itself when this config is live (it holds it by weak reference) and initialises
    # each layer's weights gathered on rank 0, then scattered: a partitioned weight is empty on every rank.
    live = HfDeepSpeedConfig(deepspeed_config(spec))
    try:
        return build_model(model, info)
    finally:
        unset_hf_deepspeed_config()
        del live


def build_engine(
    model: nn.Module, spec: JobSpec, total_steps: int, prepare: Callable[[nn.Module], nn.Module]
) -> "DDPEngine | DeepSpeedEngine":
    """Wrap `model` according to spec.distributed.strategy; `prepare` places it (and wraps it in DDP under Train)."""
    if spec.train.activation_checkpointing:
        from steward.models.transformer import HFTransformer  # the spec allows it for Transformers only

        if isinstance(model, HFTransformer):
            model.checkpoint_activations()
    if spec.distributed.strategy == "deepspeed":
        return DeepSpeedEngine(model, spec, total_steps)
    return DDPEngine(prepare(model), spec, total_steps)


def _ask_for_the_cpu_once() -> None:
    """DeepSpeed's op builders ask py-cpuinfo about the CPU twice for every op they load, and each answer comes from a
    new Python subprocess (about a second here); the answer cannot change within a process, so it is asked once."""
    import cpuinfo  # a dependency of deepspeed

    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)


class DeepSpeedEngine:
    """A DeepSpeed engine; ZeRO shards optimizer state (1), gradients (2) and parameters (3)."""

    every_rank_saves = True  # each rank writes its own ZeRO shards

    def __init__(self, model: nn.Module, spec: JobSpec, total_steps: int):
        import deepspeed

        _ask_for_the_cpu_once()
        scheduler = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))  # noqa: E731
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=trainable(model), config=deepspeed_config(spec), lr_scheduler=scheduler
        )
        # Frozen weights (under an adapter) come back from the model's own source on a resume, never from a checkpoint.
        self.frozen = any(not p.requires_grad for p in model.parameters())
        self.module: nn.Module = self.engine.module
        self.input_dtype = PRECISION_DTYPES[spec.train.precision]
        self.zero_stage = spec.distributed.zero_stage

    def __call__(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if inputs.is_floating_point():
            inputs = inputs.to(self.input_dtype)
        return self.engine(inputs, attention_mask)

    def backward_step(self, loss: torch.Tensor) -> bool:
        """Backward and, at an accumulation boundary, an optimizer step; True when a step happened."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        self.engine.step()
        return boundary

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @property
    def global_step(self) -> int:
        return self.engine.global_steps

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="state", exclude_frozen_parameters=self.frozen)

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does at each forward.

        DeepSpeed leaves buffers alone, so each rank's running statistics follow its own data shard; evaluation and
        the exported model must see one set.
        """
        import torch.distributed as dist

        if dist.is_initialized():
            for buffer in self.module.buffers():
                dist.broadcast(buffer, src=0)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="state", load_module_strict=not self.frozen)
        if path is None:
            raise RuntimeError(f"no DeepSpeed state in checkpoint {folder}")

    def apply_optimizer_settings(self, spec: JobSpec) -> None:
        apply_optimizer_settings(self.engine.lr_scheduler, spec)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model in fp32 (what export saves). Under ZeRO-3 a collective: every rank gathers one tensor at a
        time and rank 0 keeps its copy, so no rank ever holds the whole model beside its shards (other ranks get {})."""
        if self.zero_stage != 3:
            return _fp32_copy(self.module.state_dict())
        import deepspeed

        keep = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        state: dict[str, torch.Tensor] = {}
        copies: dict[int, torch.Tensor] = {}  # a tied weight is gathered and copied once
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            if id(tensor) not in copies:
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                    copies[id(tensor)] = _fp32_copy({name: tensor})[name] if keep else tensor
            if keep:
                state[name] = copies[id(tensor)]
        return state


class DDPEngine:
    """PyTorch DistributedDataParallel with a plain optimizer, autocast for bf16/fp16.

    fp16 scales the loss (torch.amp.GradScaler): small gradients would underflow in fp16, and a step whose gradients
    overflow is skipped, the scale halved, instead of writing inf into the weights.
    """

    every_rank_saves = False  # replicas are identical: rank 0's state is the state

    def __init__(self, ddp: nn.Module, spec: JobSpec, total_steps: int):
        model = ddp.module if isinstance(ddp, nn.parallel.DistributedDataParallel) else ddp
        self.module, self.ddp = model, ddp
        opt = spec.train.optimizer
        self.optimizer: torch.optim.Optimizer
        if opt.name == "adamw":
            self.optimizer = torch.optim.AdamW(
                trainable(model), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                trainable(model), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(spec, total_steps))
        self.accum, self.clip = spec.train.grad_accum_steps, spec.train.grad_clip
        self.dtype = PRECISION_DTYPES[spec.train.precision]
        self.device = next(model.parameters()).device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.micro_step = 0
        self.global_step = 0

    def __call__(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.ddp(inputs, attention_mask)

    def backward_step(self, loss: torch.Tensor) -> bool:
        """Backward and, at an accumulation boundary, an optimizer step; True at a boundary.

        A boundary whose fp16 gradients overflowed counts as a step, as DeepSpeed counts it, but leaves the weights
        and the learning-rate schedule where they were.
        """
        self.micro_step += 1
        self.scaler.scale(loss / self.accum).backward()
        if self.micro_step % self.accum:
            return False
        if self.clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if not self.scaler.is_enabled() or self.scaler.get_scale() >= scale:  # a lower scale: the step was skipped
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return True

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def train(self, mode: bool = True) -> None:
        self.ddp.train(mode)

    def save(self, folder: Path) -> None:
        state = {
            "model": trained_state(self.module),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),  # empty unless fp16
            "global_step": self.global_step,
        }
        torch.save(state, Path(folder) / "ddp_state.pt")

    def load(self, folder: Path) -> None:
        state = torch.load(Path(folder) / "ddp_state.pt", map_location=self.device, weights_only=True)
        load_trained_state(self.module, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):  # a checkpoint saved at another precision has none
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = state["global_step"]

    def apply_optimizer_settings(self, spec: JobSpec) -> None:
        apply_optimizer_settings(self.scheduler, spec)

    def sync_buffers(self) -> None:
        """DDP already broadcasts rank 0's buffers at every forward."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return _fp32_copy(self.module.state_dict())


def apply_optimizer_settings(scheduler: torch.optim.lr_scheduler.LambdaLR, spec: JobSpec) -> None:
    """Make the spec's optimizer settings current, keeping the schedule's position and the optimizer's moments.

    A checkpoint restores the learning rate and weight decay it was saved with; after a PBT exploit or a --resume
    with an edited spec, the spec's values must win.
    """
    opt = spec.train.optimizer
    scheduler.base_lrs = [opt.lr] * len(scheduler.optimizer.param_groups)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in scheduler.optimizer.param_groups:
        group.update(initial_lr=opt.lr, lr=opt.lr * factor, weight_decay=opt.weight_decay)
        group.update({"betas": tuple(opt.betas)} if "betas" in group else {"momentum": opt.momentum})


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer steps: all of them, or an adapter's (and its head's) on a frozen model."""
    return [p for p in model.parameters() if p.requires_grad]


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state_dict without its frozen parameters: what a checkpoint must hold to resume it."""
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {name: tensor for name, tensor in model.state_dict().items() if name not in frozen}


def _fp32_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone() for k, v in state.items()}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
