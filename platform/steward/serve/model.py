"""The model a replica serves: loaded from a run folder, optionally int8, with input checks. No Ray, no HTTP."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from steward.data import DataError, DataInfo, encode_instances
from steward.runs import spec_hash
from steward.serve.protocol import BadRequest
from steward.serve.quantize import GateResult, accuracy_gate, quantize_int8
from steward.spec import JobSpec


@dataclass
class ServedModel:
    """A run's model ready for inference: `probabilities(instances)` -> float32 [N, C]."""

    model: nn.Module
    info: DataInfo
    spec: JobSpec
    run_dir: Path
    gate: GateResult | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        """The run id, suffixed with the precision when it is not the trained fp32."""
        suffix = "-int8" if self.gate is not None else ""
        return self.run_dir.name + suffix

    def encode(self, instances: Any, field: str = "instances") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw instances -> model tensors exactly as training encoded them; BadRequest 422 naming the bad one."""
        if self.info.modality == "text":
            for i, text in enumerate(instances):
                if isinstance(text, str) and not _is_utf8(text):
                    raise BadRequest(422, f"{field}[{i}]", "text is not valid UTF-8 (lone surrogate escape)")
        try:
            return encode_instances(instances, self.info, self.spec.data.max_length, field=field)
        except DataError as err:
            where, message = err.problems[0]
            raise BadRequest(422, where, message) from None

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> np.ndarray:
        """Class probabilities float32 [N, C] of already encoded inputs."""
        return torch.softmax(self.model(inputs, mask).float(), dim=-1).numpy()

    def probabilities(self, instances: Any, field: str = "instances") -> np.ndarray:
        """Encode and run in one go (the unbatched path, and offline comparisons)."""
        return self.forward(*self.encode(instances, field))


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_served_model(spec: JobSpec, run_dir: str | Path, gate: dict | None = None) -> ServedModel:
    """The run's consolidated model, quantized to int8 when serve.quantize says so.

    int8 is checked against fp32 on the validation split (QuantizationRefused when it drops more than
    serve.quantize_tolerance) unless `gate` carries the result of that same check, made before deploying.
    """
    from steward.evaluate.run import load_servable

    run_dir = Path(run_dir)
    model, info = load_servable(run_dir / "model")
    result = None
    if spec.serve is not None and spec.serve.quantize == "int8":
        int8 = quantize_int8(model)
        result = GateResult(**{k: v for k, v in gate.items() if k != "passed"}) if gate else None
        result = result or accuracy_gate(model, int8, info, spec)
        model = int8
    return ServedModel(model, info, spec, run_dir, result, run_metadata(spec, run_dir))


def run_metadata(spec: JobSpec, run_dir: Path) -> dict[str, Any]:
    """What the model info route shows about the run: ids, hashes, training metrics, model card."""
    status_file, metrics_file = run_dir / "status.json", run_dir / "metrics.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    card = next((p for p in (run_dir / "model_card.md", run_dir / "model" / "README.md") if p.exists()), None)
    return {
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "spec_hash": status.get("spec_hash") or spec_hash(spec),
        "training_metrics": json.loads(metrics_file.read_text()) if metrics_file.exists() else None,
        "model_card": str(card) if card else None,
    }
