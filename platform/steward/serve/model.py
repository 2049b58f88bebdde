"""The model a replica serves: loaded from a run folder, optionally int8, with input checks. No Ray, no HTTP."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from steward.data import DataError, DataInfo, encode_instances
from steward.evaluate.profile import EmbeddingTap, penultimate_layer
from steward.evaluate.thresholds import Thresholds, adjust_probabilities, load_thresholds
from steward.runs import spec_hash
from steward.serve.protocol import BadRequest
from steward.serve.quantize import GateResult, accuracy_gate, quantize_int8, save_int8_reference
from steward.spec import JobSpec


@dataclass
class Output:
    """One request's share of a forward pass."""

    probabilities: np.ndarray
    embeddings: np.ndarray | None = None
    inputs: np.ndarray | None = None
    attention_mask: np.ndarray | None = None


@dataclass
class ServedModel:
    """A run's model ready for inference: `probabilities(instances)` -> float32 [N, C]."""

    model: nn.Module
    info: DataInfo
    spec: JobSpec
    run_dir: Path
    gate: GateResult | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    thresholds: Thresholds | None = None  # per-group decision thresholds saved with the model (train.mitigation)

    _tapped: tuple[nn.Module, EmbeddingTap] | None = field(default=None, init=False, repr=False)

    def embedding_tap(self) -> EmbeddingTap:
        """The tap on the layer whose input is the record's embedding; put on once per model, at the first request
        that embeds (a model never monitored keeps its hook-free fast path)."""
        if self._tapped is None or self._tapped[0] is not self.model:  # int8 serving swaps the model in
            layer = dict(self.model.named_modules())[penultimate_layer(self.model)]
            self._tapped = (self.model, EmbeddingTap(layer))
        return self._tapped[1]

    @property
    def version(self) -> str:
        """The run id, suffixed with the precision when it is not the trained fp32."""
        suffix = "-int8" if self.gate is not None else ""
        return self.run_dir.name + suffix

    def prepare(self, instances: Any, field: str = "instances") -> Any:
        """Check raw instances, naming the bad one in a BadRequest 422; returns what `run` takes.

        Text stays a list of strings (tokenized later, a whole batch at once); arrays become a float tensor.
        """
        if self.info.modality == "text":
            for i, text in enumerate(instances):
                problem = _text_problem(text)
                if problem:
                    raise BadRequest(422, f"{field}[{i}]", problem)
            return list(instances)
        try:
            return encode_instances(instances, self.info, self.spec.data.max_length, field=field)[0]
        except DataError as err:
            where, message = err.problems[0]
            raise BadRequest(422, where, message) from None

    @torch.inference_mode()
    def run(self, prepared: list[Any], embed: bool = False) -> list[Output]:
        """Class probabilities (float32 [n_i, C]) for each prepared request, in one forward pass over all of them;
        with `embed`, also the penultimate layer's output and the encoded inputs (what the monitor profiles)."""
        sizes = [len(p) for p in prepared]
        if self.info.modality == "text":  # padded to max_length as in training: batching never changes a result
            texts = [text for p in prepared for text in p]
            inputs, mask = encode_instances(texts, self.info, self.spec.data.max_length)
        else:
            inputs, mask = (prepared[0] if len(prepared) == 1 else torch.cat(prepared)), None
        tap = self.embedding_tap() if embed else None
        if tap is not None:
            tap.start()
        try:
            out = torch.softmax(self.model(inputs, mask).float(), dim=-1).numpy()
        finally:
            seen = tap.stop() if tap is not None else []
        # one conversion each, then numpy slices (views): a torch slice per request costs ~1 us more
        embeddings = (seen[0] if len(seen) == 1 else torch.cat(seen)).numpy() if seen else None
        x = inputs.numpy() if embed else None
        m = mask.numpy() if embed and mask is not None else None
        starts = np.cumsum([0, *sizes[:-1]])
        return [
            Output(
                out[s : s + n],
                None if embeddings is None else embeddings[s : s + n],
                None if x is None else x[s : s + n],
                None if m is None else m[s : s + n],
            )
            for s, n in zip(starts, sizes, strict=True)
        ]

    def decide(self, probabilities: np.ndarray, attributes: dict[str, list[Any]]) -> np.ndarray:
        """Probabilities whose argmax is the model's per-group thresholded decision (unchanged without thresholds).

        The group of each instance comes from the request's attributes; without it the decision cannot be
        made as trained, so that is a 422 naming the attribute to send.
        """
        if self.thresholds is None:
            return probabilities
        column = self.thresholds.group_column
        if column not in attributes:
            raise BadRequest(422, f"attributes.{column}", "this model applies per-group decision thresholds; "
                             f"send each instance's {column!r} in attributes")  # fmt: skip
        return adjust_probabilities(probabilities, attributes[column], self.thresholds)

    def probabilities(self, instances: Any, field: str = "instances") -> np.ndarray:
        """Check and run one request's instances (the offline path the tests compare against)."""
        return self.run([self.prepare(instances, field)])[0].probabilities


def _text_problem(text: Any) -> str | None:
    if not isinstance(text, str):
        return f"expected a string for text data, got {type(text).__name__}"
    if not _is_utf8(text):
        return "text is not valid UTF-8 (lone surrogate escape)"
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_served_model(spec: JobSpec, run_dir: str | Path, gate: dict | None = None) -> ServedModel:
    """The run's consolidated model, quantized to int8 when serve.quantize says so.

    int8 is checked against fp32 on the validation split (QuantizationRefused when it drops more than
    serve.quantize_tolerance) unless `gate` carries the result of that same check, made before deploying. With the
    check, a monitored int8 model is also profiled for the monitor (`save_int8_reference`).
    """
    from steward.evaluate.run import load_servable

    run_dir = Path(run_dir)
    model, info = load_servable(run_dir / "model")
    result = None
    if spec.serve is not None and spec.serve.quantize == "int8":
        int8 = quantize_int8(model)
        if gate:
            result = GateResult(**{k: v for k, v in gate.items() if k != "passed"})
        else:
            result = accuracy_gate(model, int8, info, spec)
            if spec.monitor is not None and spec.monitor.drift is not None:
                save_int8_reference(int8, info, spec, run_dir)
        model = int8
    thresholds = load_thresholds(run_dir / "model")
    return ServedModel(model, info, spec, run_dir, result, run_metadata(spec, run_dir), thresholds)


def run_metadata(spec: JobSpec, run_dir: Path) -> dict[str, Any]:
    """What the model info route shows about the run: ids, hashes, training metrics, model card."""
    status_file, metrics_file = run_dir / "status.json", run_dir / "metrics.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    card_file = run_dir / "model_card.json"
    return {
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "spec_hash": status.get("spec_hash") or spec_hash(spec),
        "training_metrics": json.loads(metrics_file.read_text()) if metrics_file.exists() else None,
        "model_card": json.loads(card_file.read_text()) if card_file.exists() else None,
    }
