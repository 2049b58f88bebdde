"""The `distributed` section: workers, resources and the DeepSpeed strategy."""

from typing import Any, Literal

from pydantic import Field, model_validator

from steward.spec.base import Section, raise_problems


class DistributedSpec(Section):
    num_workers: int = Field(1, ge=1, le=4096, description="Ray Train workers (one process each).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL and DeepSpeed's CUDA accelerator.")
    cpus_per_worker: float = Field(
        1.0, gt=0.0, le=1024, description="CPUs reserved per worker (also its torch threads)."
    )
    gpus_per_worker: float = Field(1.0, ge=0.0, le=64, description="GPUs per worker when use_gpu is set.")
    strategy: Literal["ddp", "deepspeed"] = Field("deepspeed", description="PyTorch DDP or DeepSpeed.")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage (0 = data parallel only).")
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="ZeRO-Offload of optimizer states (stage >= 1)."
    )
    offload_params: Literal["none", "cpu"] = Field("none", description="ZeRO-Infinity parameter offload (stage 3).")
    compact_memory: bool = Field(
        False,
        description="Each worker gives the memory it frees back to the system at once (allocations of 1 MiB and more "
        "are mapped, not pooled in the C heap, where freed pieces stay in the process): a lower peak a worker, for "
        "slower steps. For a model that fits only this way; `steward estimate` counts it. Linux (glibc) only.",
    )
    deepspeed_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Merged last into the DeepSpeed config; DeepSpeed validates it at start."
    )
    max_failures: int = Field(
        0, ge=-1, le=10_000, description="Worker-group restarts from the last checkpoint (-1: forever)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> "DistributedSpec":
        problems = {}
        if self.strategy == "ddp" and (self.zero_stage or self.deepspeed_overrides):
            problems["strategy"] = "zero_stage and deepspeed_overrides need strategy: deepspeed"
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            problems["offload_optimizer"] = "offloading the optimizer needs zero_stage >= 1"
        if self.offload_params != "none" and self.zero_stage != 3:
            problems["offload_params"] = "offloading parameters needs zero_stage: 3"
        raise_problems(self, problems)
        return self
