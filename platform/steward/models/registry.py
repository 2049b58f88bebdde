"""One entry point from a model spec and the data's shape to an nn.Module, its fit checks, and its loss."""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steward.data.info import DataInfo
from steward.errors import StewardError
from steward.models.cnn import build_cnn, cnn_problems
from steward.models.lstm import build_lstm, lstm_problems
from steward.spec.model import ModelSpec

FAMILY_MODALITIES = {"cnn": ("image",), "lstm": ("image", "sequence", "text"), "transformer": ("text",)}
IGNORE_INDEX = -100  # the label value that contributes no loss, as in torch and Hugging Face


def build_model(model: ModelSpec, info: DataInfo, config_dir: str | Path | None = None) -> nn.Module:
    """The nn.Module for `model` sized for the data `info` describes.

    Every model's forward(inputs, attention_mask=None) returns logits: [B, num_classes] for classification,
    [B, L, vocab_size] for causal_lm. `config_dir` (transformers only) rebuilds a saved model from its
    Hugging Face config with random weights, without needing the original pretrained folder.
    Raises StewardError listing every problem `check_fits` finds.
    """
    # A saved model is rebuilt from its own config, so the pretrained source need not exist any more.
    problems = check_fits(model, info) if config_dir is None else _general_problems(model, info)
    if problems:
        raise StewardError("model does not fit the data:\n  - " + "\n  - ".join(problems))
    if model.family == "cnn":
        return build_cnn(model.params, info)
    if model.family == "lstm":
        return build_lstm(model.params, info)
    # Imported here: importing transformers is slow, and CNN and LSTM runs do not need it.
    from steward.models.transformer import build_transformer

    return build_transformer(model.params, model.task, info, config_dir=config_dir, adapter=model.adapter)


def check_fits(model: ModelSpec, info: DataInfo) -> list[str]:
    """Every reason `model` cannot be built for the data `info` describes, as "<field>: <problem and fix>".

    Returns [] when the model fits. A pretrained transformer's config is read (not its weights).
    """
    problems = _general_problems(model, info)
    if info.modality not in FAMILY_MODALITIES.get(model.family, ()):
        return problems
    if model.family == "cnn":
        problems += cnn_problems(model.params, info)
    elif model.family == "lstm":
        problems += lstm_problems(model.params, info)
    else:
        from steward.models.transformer import transformer_problems

        problems += transformer_problems(model.params, model.task, info, model.adapter)
    return problems


def _general_problems(model: ModelSpec, info: DataInfo) -> list[str]:
    """Family against modality, task against family and labels: what needs no family-specific code."""
    problems = []
    modalities = FAMILY_MODALITIES.get(model.family, ())
    if info.modality not in modalities:
        fitting = [family for family, kinds in FAMILY_MODALITIES.items() if info.modality in kinds]
        problems.append(
            f"model.family: {model.family} needs {' or '.join(modalities)} data, but the data is "
            f"{info.modality}; use family: {' or '.join(fitting)}"
        )
    if model.task == "causal_lm" and model.family != "transformer":
        problems.append(f"model.task: causal_lm needs family: transformer, not {model.family}")
    if model.task == "classification":
        if info.num_classes is None:
            problems.append(
                "model.task: classification needs labelled data but the data has no classes; "
                "set data.label_column, or use task: causal_lm with family: transformer"
            )
        elif info.num_classes < 2:
            problems.append(
                f"model.task: classification needs at least 2 classes but the data has {info.num_classes}; "
                "check data.label_column and the splits"
            )
    return problems


def task_loss(task: str, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean cross entropy for `task`, in fp32, ignoring labels equal to -100.

    classification: logits [B, C], labels [B]. causal_lm: logits [B, L, V], labels [B, L] (the input ids
    with padding set to -100); position t predicts label t + 1. `weight` [B] weights each row (each of
    its tokens for causal_lm): sum(w * ce) / sum(w) over the labels that count. With nothing to count the
    loss is 0, not NaN, so one fully padded batch cannot poison training.
    """
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    elif task != "classification":
        raise ValueError(f"model.task: unknown task {task!r}; use classification or causal_lm")
    if weight is not None and weight.shape != labels.shape[:1]:
        raise ValueError(f"task_loss: weight must be [B] = {tuple(labels.shape[:1])}, got {tuple(weight.shape)}")
    # fp32 because a bf16 log-softmax over a large vocabulary loses the small probabilities.
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)
    counted = (labels != IGNORE_INDEX).float()
    if weight is not None:
        counted = counted * weight.float().view(-1, *([1] * (labels.dim() - 1)))
    return (ce * counted).sum() / counted.sum().clamp_min(torch.finfo(torch.float32).tiny)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights count once), also when ZeRO-3 has partitioned them."""
    # DeepSpeed ZeRO-3 leaves an empty tensor in place and records the real size as ds_numel.
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def load_trained_state(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load a checkpoint's weights into `model`: all of them, or, for an adapted model, at least every weight that
    trains (its checkpoints leave the frozen ones out: the model rebuilds them from the same source).

    Raises ValueError naming keys that are missing or unknown.
    """
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    result = model.load_state_dict(state_dict, strict=False)
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint does not match the model (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}); "
            "evaluate it with the spec of the run that wrote it"
        )
