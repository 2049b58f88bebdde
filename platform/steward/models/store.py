"""The servable model on disk: safetensors weights, the spec and data shape, and (transformers) the HF config.

Loading needs torch, safetensors and transformers only: no DeepSpeed, no Ray.

    out_dir/model.safetensors   fp32 weights, every state_dict key (tied weights stored under each name)
    out_dir/model.json          {"model": <model spec>, "data": <DataInfo>, "num_parameters": int,
                                 "adapter": what was adapted and how many parameters trained, or null}
    out_dir/hf_config/          config.json of a transformer, so it rebuilds without its pretrained folder
"""

import json
from collections import defaultdict
from pathlib import Path

import torch
from pydantic import TypeAdapter
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from steward.data.info import DataInfo
from steward.errors import StewardError
from steward.models.registry import build_model, count_parameters
from steward.spec.model import ModelSpec

WEIGHTS = "model.safetensors"
METADATA = "model.json"
HF_CONFIG = "hf_config"


def save_model(
    out_dir: str | Path, model: nn.Module, state_dict: dict[str, Tensor], model_spec: ModelSpec, info: DataInfo
) -> None:
    """Write the servable model to `out_dir` (created if missing).

    `state_dict` holds the consolidated weights (e.g. gathered from ZeRO shards); `model` is the matching
    bare module, used for its key names, tied weights, parameter count and Hugging Face config. Floating
    tensors are stored as contiguous fp32 copies: safetensors refuses tensors that share storage, such as
    GPT-2's lm_head tied to its token embedding. A model with an adapter is saved with the adapter merged into
    its weights: a plain model of its architecture. Raises ValueError when the keys do not match `model`.
    """
    out = Path(out_dir)
    tensors = _matching_state(model, state_dict)
    adapter = getattr(model_spec, "adapter", None)
    summary = None
    if adapter is not None:
        from steward.models.adapter import adapter_summary
        from steward.models.transformer import merged_transformer

        summary = adapter_summary(model, adapter)
        model = merged_transformer(model, tensors, adapter, model_spec.task)  # type: ignore[arg-type]
        tensors = _matching_state(model, model.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: _servable(tensor) for name, tensor in tensors.items()}, str(out / WEIGHTS), {"format": "pt"})
    hf = getattr(model, "hf", None)
    if hf is not None:
        hf.config.save_pretrained(str(out / HF_CONFIG))
    metadata = {
        "model": model_spec.model_dump(mode="json"),
        "data": info.to_dict(),
        "num_parameters": count_parameters(model),
        "adapter": summary,
    }
    (out / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")


def load_model(out_dir: str | Path) -> tuple[nn.Module, ModelSpec, DataInfo]:
    """The model `save_model` wrote to `out_dir`, in eval mode, with its spec and data shape."""
    out = Path(out_dir)
    for name in (METADATA, WEIGHTS):
        if not (out / name).is_file():
            raise StewardError(f"load_model: {out / name} is missing; point at a folder save_model wrote")
    metadata = json.loads((out / METADATA).read_text())
    spec = TypeAdapter(ModelSpec).validate_python(metadata["model"])
    info = DataInfo.from_dict(metadata["data"])
    config_dir = out / HF_CONFIG if spec.family == "transformer" else None
    model = build_model(spec, info, config_dir=config_dir)
    model.load_state_dict(load_file(str(out / WEIGHTS)), strict=True)
    return model.eval(), spec, info


def _matching_state(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state_dict` with tied names completed; ValueError when its keys are not those of `model`."""
    tensors = _complete_tied(model, state_dict)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"save_model: state_dict does not match the model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); pass the consolidated state_dict of this model, without wrapper prefixes"
        )
    return tensors


def _servable(tensor: Tensor) -> Tensor:
    """A contiguous CPU copy, fp32 when floating: never a view that shares storage with another entry."""
    dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def _complete_tied(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state_dict` plus tied names it left out (consolidation and HF saving keep one name per tensor).

    Ties are found by object identity in `model`, which holds also when ZeRO-3 left its tensors empty.
    """
    names_of: dict[int, list[str]] = defaultdict(list)
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names_of[id(tensor)].append(name)
    persistent = set(model.state_dict())
    tensors = dict(state_dict)
    for names in names_of.values():
        present = next((name for name in names if name in tensors), None)
        for name in names:
            if present is not None and name in persistent:
                tensors.setdefault(name, tensors[present])
    return tensors
