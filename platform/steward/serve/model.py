"""The model a replica serves: loaded from a run folder, optionally int8, with input checks. No Ray, no HTTP.

A replica never sees the job spec: it gets a `ModelSource`, the plain data that loading and serving the model need,
made once where the application is built (`model_source`).
"""

import json
import time
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
from steward.serve.protocol import BadRequest, Prediction, PredictResponse
from steward.serve.quantize import GateResult, check_int8, quantize_int8
from steward.spec import JobSpec

REGISTERED = "registry.json"  # in a folder fetched from the model registry: which version it is


@dataclass(frozen=True)
class ModelSource:
    """What a replica needs to load and serve a run's model, as plain data."""

    run_dir: str
    family: str  # model.family: /info shows it, /explain checks its baseline against it
    max_length: int  # data.max_length: requests are encoded as training encoded its data
    spec_hash: str  # of the spec served, for /info when the run's status.json has none
    int8: GateResult | None = None  # serve int8: the accuracy gate it passed before any replica started


def model_source(spec: JobSpec, run_dir: str | Path, gate: GateResult | None = None) -> ModelSource:
    """What replicas need to serve `run_dir`'s model as `spec` says. With serve.quantize int8 the accuracy gate runs
    here (QuantizationRefused when it fails) unless `gate` carries its result."""
    int8 = spec.serve is not None and spec.serve.quantize == "int8"
    if int8 and gate is None:
        gate = check_int8(spec, run_dir)
    return ModelSource(str(run_dir), spec.model.family, spec.data.max_length, spec_hash(spec), gate if int8 else None)


@dataclass
class Output:
    """One request's share of a forward pass."""

    probabilities: np.ndarray
    embeddings: np.ndarray | None = None
    inputs: np.ndarray | None = None
    attention_mask: np.ndarray | None = None
    encode_s: float = 0.0  # the whole pass's tokenizing and forward times, which every request in it waited for
    forward_s: float = 0.0
    pass_rows: int = 0  # instances in the whole pass

    @property
    def model_s(self) -> float:
        """This request's share of its pass's time (tokenizing and forward), by its instances."""
        return (self.encode_s + self.forward_s) * len(self.probabilities) / max(self.pass_rows, 1)


NON_FINITE = "the model's output for this instance is not finite: its values are far outside the training data's"


def non_finite_row(output: Output) -> int | None:
    """The first instance whose probabilities (or embedding, when taken) are not finite, or None.

    Finite inputs far outside the training range can overflow inside the model (1e36 pixels through a CNN); the
    rows that did are refused rather than answered with NaN, and never reach the monitor.
    """
    bad = ~np.isfinite(output.probabilities).all(axis=-1)
    if output.embeddings is not None:
        bad |= ~np.isfinite(output.embeddings.reshape(len(output.embeddings), -1)).all(axis=-1)
    return int(bad.argmax()) if bad.any() else None


@dataclass
class ServedModel:
    """A run's model ready for inference: `probabilities(instances)` -> float32 [N, C]."""

    model: nn.Module
    info: DataInfo
    source: ModelSource
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
    def run_dir(self) -> Path:
        return Path(self.source.run_dir)

    @property
    def gate(self) -> GateResult | None:
        """The int8 accuracy gate this model passed; None when it is served in fp32."""
        return self.source.int8

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
            return encode_instances(instances, self.info, self.source.max_length, field=field)[0]
        except DataError as err:
            where, message = err.problems[0]
            raise BadRequest(422, where, message) from None

    @torch.inference_mode()
    def run(self, prepared: list[Any], embed: bool = False) -> list[Output]:
        """Class probabilities (float32 [n_i, C]) for each prepared request, in one forward pass over all of them;
        with `embed`, also the penultimate layer's output and the encoded inputs (what the monitor profiles)."""
        sizes = [len(p) for p in prepared]
        started = time.perf_counter()
        if self.info.modality == "text":  # padded to max_length as in training: batching never changes a result
            texts = [text for p in prepared for text in p]
            inputs, mask = encode_instances(texts, self.info, self.source.max_length)
        else:
            inputs, mask = (prepared[0] if len(prepared) == 1 else torch.cat(prepared)), None
        encoded = time.perf_counter()
        tap = self.embedding_tap() if embed else None
        if tap is not None:
            tap.start()
        try:
            out = torch.softmax(self.model(inputs, mask).float(), dim=-1).numpy()
        finally:
            seen = tap.stop() if tap is not None else []
        # one conversion each, then numpy slices (views), cheaper than a torch slice per request
        forward_s = time.perf_counter() - encoded
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
                encoded - started,
                forward_s,
                len(out),
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
            problem = f"this model applies per-group decision thresholds; send each instance's {column!r} in attributes"
            raise BadRequest(422, f"attributes.{column}", problem)
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


def open_served_model(source: ModelSource) -> ServedModel:
    """The run's consolidated model as a replica serves it: quantized to int8 when its gate passed."""
    from steward.evaluate.run import load_servable

    run_dir = Path(source.run_dir)
    model, info = load_servable(run_dir / "model")
    if source.int8 is not None:
        model = quantize_int8(model)
    thresholds = load_thresholds(run_dir / "model")
    return ServedModel(model, info, source, run_metadata(run_dir, source.spec_hash), thresholds)


def load_served_model(spec: JobSpec, run_dir: str | Path, gate: GateResult | None = None) -> ServedModel:
    """The run's model as a replica would serve it under `spec` (offline, and where the int8 gate is checked).

    With serve.quantize int8, int8 is checked against fp32 on the validation split (QuantizationRefused when it drops
    more than serve.quantize_tolerance) unless `gate` carries the result of that same check; with the check, a
    monitored int8 model is also profiled for the monitor (`save_int8_reference`).
    """
    return open_served_model(model_source(spec, run_dir, gate))


def contract_problem(champion: Path, challenger: Path) -> str | None:
    """How `challenger`'s model answers requests differently from `champion`'s (input kind and shape, classes)."""
    infos = [json.loads((Path(run) / "model" / "model.json").read_text())["data"] for run in (champion, challenger)]
    fields = ["modality", "label_names"] + (["input_shape"] if infos[0]["modality"] != "text" else [])
    for name in fields:
        if infos[0].get(name) != infos[1].get(name):
            return f"its model's {name} is {infos[1].get(name)}, the champion's {infos[0].get(name)}"
    return None


def run_metadata(run_dir: Path, spec_hash: str) -> dict[str, Any]:
    """What the model info route shows about the run: ids, hashes, training metrics, model card."""
    status_file, metrics_file = run_dir / "status.json", run_dir / "metrics.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    card_file, registry_file = run_dir / "model_card.json", run_dir / REGISTERED
    return {
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "spec_hash": status.get("spec_hash") or spec_hash,
        "training_metrics": json.loads(metrics_file.read_text()) if metrics_file.exists() else None,
        "model_card": json.loads(card_file.read_text()) if card_file.exists() else None,
        # a model served from the registry: its name, version and aliases
        "registry": json.loads(registry_file.read_text()) if registry_file.exists() else None,
    }


def predict_response(served: ServedModel, name: str, probabilities: Any, request_ids: list[str]) -> PredictResponse:
    """steward's JSON reply: one prediction (request id, label, class id, probabilities) per instance."""
    labels = served.info.label_names
    predictions = [
        Prediction(
            request_id=request_id,
            label=labels[int(row.argmax())],
            class_id=int(row.argmax()),
            probabilities=row.tolist(),
        )
        for row, request_id in zip(probabilities, request_ids, strict=True)
    ]
    return PredictResponse(model=name, model_version=served.version, labels=labels, predictions=predictions)
