"""The `serve` section: how the trained model is deployed on Ray Serve."""

from typing import Literal

from pydantic import Field, model_validator

from steward.spec.base import Section, raise_problems
from steward.spec.rollout import RolloutSpec

DAY = 86_400.0


class AutoscalingSpec(Section):
    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest replicas; 0 scales to zero when idle.")
    max_replicas: int = Field(2, ge=1, le=1000, description="Most replicas under load.")
    target_ongoing_requests: float = Field(
        2.0, gt=0.0, le=100_000, description="Ongoing requests per replica that the autoscaler aims for."
    )
    upscale_delay_s: float = Field(
        30.0, ge=0.0, le=DAY, description="Load must stay high this long before adding replicas."
    )
    downscale_delay_s: float = Field(
        600.0, ge=0.0, le=DAY, description="Load must stay low this long before removing replicas."
    )
    metrics_interval_s: float = Field(
        10.0, gt=0.0, le=600.0, description="How often replicas report their load to the autoscaler."
    )
    look_back_period_s: float = Field(30.0, gt=0.0, le=DAY, description="Window the autoscaler averages the load over.")

    @model_validator(mode="after")
    def _min_below_max(self) -> "AutoscalingSpec":
        if self.min_replicas > self.max_replicas:
            raise_problems(self, {"min_replicas": f"must be <= max_replicas ({self.max_replicas}); raise max_replicas"})
        return self


class BatchingSpec(Section):
    max_batch_size: int = Field(
        16,
        ge=1,
        le=4096,
        description="Most requests `@serve.batch` groups into one call (a causal LM: decodes at once).",
    )
    batch_wait_timeout_ms: float = Field(
        5.0,
        ge=0.0,
        le=10_000.0,
        description="Longest wait for a batch to fill before running it (a causal LM's requests join the running "
        "batch at its next token instead).",
    )


class AuthSpec(Section):
    api_keys_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding API keys (comma-separated); never put keys in the spec.",
    )
    api_keys_file: str | None = Field(
        None, description="File holding API keys, one a line (`#` starts a comment); read when Serve starts."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "AuthSpec":
        if (self.api_keys_env is None) == (self.api_keys_file is None):
            raise_problems(self, {"api_keys_env": "set exactly one of api_keys_env or api_keys_file"})
        return self


class GenerationSpec(Section):
    """Bounds on what one request to a causal LM's generation endpoints may ask for."""

    max_new_tokens: int = Field(
        256, ge=1, le=32_768, description="Most tokens one request may generate (its max_tokens)."
    )
    max_prompt_tokens: int = Field(
        1024, ge=1, le=1_000_000, description="Longest prompt accepted, in tokens after the chat template."
    )
    perplexity_tolerance: float = Field(
        0.05,
        ge=0.0,
        le=10.0,
        description="With quantize: int8, refuse to deploy when int8 validation perplexity is more than this "
        "fraction above fp32's (0.05 = 5%).",
    )


class ServeSpec(Section):
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Serve application name (default: the job name); also the OIP model name.",
    )
    route_prefix: str = Field(
        "/", pattern=r"^/[A-Za-z0-9_./-]*$", description="HTTP path prefix of every endpoint, e.g. /digits."
    )
    num_cpus: float = Field(1.0, ge=0.0, le=1024, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0.0, le=64, description="GPUs reserved per replica.")
    torch_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads per replica.")
    max_ongoing_requests: int = Field(
        64, ge=1, le=100_000, description="Requests one replica holds at once; more queue at the proxy."
    )
    num_replicas: int | None = Field(None, ge=1, le=1000, description="Fixed replica count (not with autoscaling).")
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Replica range and load target (not with num_replicas)."
    )
    batching: BatchingSpec | None = Field(
        default_factory=BatchingSpec, description="Group concurrent requests into one forward pass; null: off."
    )
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: post-training dynamic quantization of Linear/LSTM layers for CPU serving."
    )
    quantize_tolerance: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Refuse to deploy when int8 validation accuracy is more than this below fp32 (0.01 = 1 point); "
        "a causal LM's gate is generation.perplexity_tolerance.",
    )
    auth: AuthSpec | None = Field(None, description="API keys required on every route but health checks.")
    max_instances: int = Field(256, ge=1, le=100_000, description="Most instances one request may carry.")
    max_body_bytes: int = Field(
        4_000_000, ge=1024, le=1_000_000_000, description="Largest request body accepted, in bytes."
    )
    generation: GenerationSpec | None = Field(
        None, description="causal_lm only: bounds on prompts and sampling (the defaults when unset)."
    )
    output_pii: Literal["allow", "mask", "block"] = Field(
        "allow",
        description="causal_lm only: what the client receives when generated text holds personal data (the "
        "privacy section's entity types, else every rule-based one): allow sends it as generated, mask replaces "
        "each value with its type tag (<EMAIL>), block ends the completion before it (finish_reason "
        "content_filter). mask and block hold a stream's last characters back until they cannot be part of one.",
    )

    rollout: RolloutSpec | None = Field(
        None,
        description="How `steward rollout start` brings a challenger beside the deployed champion: shadow or canary "
        "steps, and the gates judged on both arms' windows.",
    )

    @model_validator(mode="after")
    def _replicas_one_way(self) -> "ServeSpec":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise_problems(
                self, {"num_replicas": "set either num_replicas or autoscaling, not both; remove one of them"}
            )
        return self

    @property
    def replica_range(self) -> tuple[int, int]:
        """The fewest and most replicas the deployment runs: autoscaling's range, else num_replicas (1) both."""
        if self.autoscaling is not None:
            return self.autoscaling.min_replicas, self.autoscaling.max_replicas
        return (self.num_replicas or 1,) * 2

    @property
    def prefix(self) -> str:
        """The route prefix without a trailing slash ("" for the root)."""
        return self.route_prefix.rstrip("/")
