"""int8 for CPU serving: dynamic quantization of Linear and LSTM layers, the accuracy gate that guards it, and the
int8 model's own reference profile for monitoring."""

import contextlib
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from steward.data import DataInfo
from steward.errors import StewardError
from steward.monitor.reference import INT8_REFERENCE
from steward.spec import JobSpec
from steward.spec.serve import GenerationSpec


class QuantizationRefused(StewardError):
    """int8 lost more validation accuracy than serve.quantize_tolerance allows: the deployment must not start."""


@dataclass(frozen=True)
class GateResult:
    """A validation metric of the fp32 and int8 models, on the split the gate used: accuracy (int8 at most
    `tolerance` below fp32) for classifiers, perplexity (at most the fraction `tolerance` above fp32) for causal LMs."""

    split: str
    fp32: float
    int8: float
    tolerance: float
    metric: str = "accuracy"

    @property
    def passed(self) -> bool:
        if self.metric == "perplexity":
            return self.int8 <= self.fp32 * (1 + self.tolerance) + 1e-12
        return self.fp32 - self.int8 <= self.tolerance + 1e-12

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "metric": self.metric,
            f"fp32_{self.metric}": self.fp32,
            f"int8_{self.metric}": self.int8,
            "tolerance": self.tolerance,
            "passed": self.passed,
        }


def check_int8(spec: JobSpec, run_dir: str | Path) -> GateResult | None:
    """The int8 gate of the run's model when serve.quantize is int8 (else None): accuracy, or perplexity for a causal
    LM; QuantizationRefused when it fails. With drift monitoring it also profiles the int8 model for the monitor
    (`save_int8_reference`), as the gate has the data at hand. Made once, where the application is built: replicas
    only quantize."""
    if spec.serve is None or spec.serve.quantize != "int8":
        return None
    from steward.evaluate.run import load_servable

    model, info = load_servable(Path(run_dir) / "model")
    int8 = quantize_int8(model)
    if spec.model.task == "causal_lm":
        return perplexity_gate(model, int8, info, spec)
    result = accuracy_gate(model, int8, info, spec)
    if spec.monitor is not None and spec.monitor.drift is not None:
        save_int8_reference(int8, info, spec, Path(run_dir))
    return result


def quantize_int8(model: nn.Module) -> nn.Module:
    """A dynamically quantized copy of `model`: int8 weights for Linear / LSTM, activations quantized per batch.

    Convolutions stay fp32 (dynamic quantization has no int8 conv); GPT-2's Conv1D, a Linear with its weight
    transposed, becomes one first. The copy leaves `model` untouched.
    """
    import copy

    copied = _as_linear(copy.deepcopy(model).eval())
    with warnings.catch_warnings():
        # torch >= 2.10 warns that eager-mode quantization moves to torchao; the eager API still works.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copied, {nn.Linear, nn.LSTM}, dtype=torch.qint8)


def _as_linear(model: nn.Module) -> nn.Module:
    """`model` with every transformers Conv1D (y = x W + b, W [in, out]) replaced by the equal nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(*child.weight.shape)
                linear.weight = nn.Parameter(child.weight.detach().t().contiguous())
                linear.bias = nn.Parameter(child.bias.detach().clone())
                setattr(module, name, linear)
    return model


def gate_split(spec: JobSpec) -> str:
    """The split the accuracy gate measures: validation, else test; int8 is refused without either."""
    for split in ("validation", "test"):
        if split in spec.data.splits:
            return split
    raise QuantizationRefused(
        "serve.quantize: int8 needs a validation (or test) split to check its accuracy against fp32; "
        "add one to data.splits or set serve.quantize: none"
    )


def accuracy_gate(fp32: nn.Module, int8: nn.Module, info: DataInfo, spec: JobSpec) -> GateResult:
    """Compare fp32 and int8 accuracy on the gate split; raise QuantizationRefused when int8 drops too far."""
    from steward.evaluate.run import evaluate

    split = gate_split(spec)
    metrics_spec = spec.model_copy(
        update={"evaluate": spec.evaluate.model_copy(update={"metrics": ["accuracy"], "per_group": False})}
    )
    scores = [evaluate(model, info, metrics_spec, split)["overall"]["accuracy"] for model in (fp32, int8)]
    result = GateResult(split, scores[0], scores[1], spec.serve.quantize_tolerance if spec.serve else 0.01)
    if not result.passed:
        raise QuantizationRefused(
            f"serve.quantize: int8 {split} accuracy {result.int8:.4f} is "
            f"{100 * (result.fp32 - result.int8):.2f} points below fp32 "
            f"({result.fp32:.4f}), more than serve.quantize_tolerance ({result.tolerance:g}); "
            "refusing to deploy: serve fp32 (serve.quantize: none) or raise the tolerance"
        )
    return result


def perplexity_gate(fp32: nn.Module, int8: nn.Module, info: DataInfo, spec: JobSpec) -> GateResult:
    """Compare a causal LM's fp32 and int8 perplexity on the gate split; QuantizationRefused when int8's is more than
    serve.generation.perplexity_tolerance (a fraction) above fp32's."""
    from steward.evaluate.run import evaluate

    split = gate_split(spec)
    metrics_spec = spec.model_copy(update={"evaluate": spec.evaluate.model_copy(update={"metrics": ["perplexity"]})})
    scores = [evaluate(model, info, metrics_spec, split)["overall"]["perplexity"] for model in (fp32, int8)]
    tolerance = ((spec.serve and spec.serve.generation) or GenerationSpec()).perplexity_tolerance
    result = GateResult(split, scores[0], scores[1], tolerance, metric="perplexity")
    if not result.passed:
        raise QuantizationRefused(
            f"serve.quantize: int8 {split} perplexity {result.int8:.4f} is "
            f"{100 * (result.int8 / result.fp32 - 1):.2f}% above fp32 ({result.fp32:.4f}), "
            f"more than serve.generation.perplexity_tolerance ({tolerance:g}); "
            "refusing to deploy: serve fp32 (serve.quantize: none) or raise the tolerance"
        )
    return result


def save_int8_reference(int8: nn.Module, info: DataInfo, spec: JobSpec, run_dir: Path) -> None:
    """Profile the validation split with the int8 model into model/int8/, beside training's fp32 profile, so a
    monitored int8 deployment is judged against int8 outputs, not against fp32's slightly different embeddings.
    Kept once per run: callers at the same time each profile, the first rename wins and the others' (the same
    profile) is dropped."""
    from steward.evaluate.profile import capture_reference

    target = Path(run_dir) / "model" / INT8_REFERENCE
    if (target / "reference.json").exists():
        return
    partial = Path(tempfile.mkdtemp(prefix=".int8-reference-", dir=target.parent))
    try:
        if capture_reference(int8, info, spec, partial) is not None:
            with contextlib.suppress(OSError):  # another caller's rename came first
                partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
