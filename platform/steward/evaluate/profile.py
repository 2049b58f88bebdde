"""The reference profile, captured at the end of training on the validation split and saved beside the model.

Serving computes the same signals per request (`monitor.signals.record_signals`) and compares them with this.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from steward.data import DataInfo, load_splits
from steward.data.tokenizer import load_tokenizer
from steward.monitor.reference import build_reference, save_reference
from steward.monitor.signals import feature_names, record_signals
from steward.spec import JobSpec


def penultimate_layer(model: nn.Module) -> str:
    """Name of the last Linear-like layer (the classifier head): its input is the model's embedding of a record.

    Found by type name so the same name is found again after dynamic int8 quantization swaps the class.
    """
    names = [name for name, module in model.named_modules() if type(module).__name__.endswith("Linear")]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear layer to take embeddings from")
    return names[-1]


def _embedding(layer_input: torch.Tensor) -> torch.Tensor:
    """A record's embedding from the input of the embedding layer: pooled over tokens when it has a sequence axis."""
    x = layer_input.detach().float()
    return x.mean(dim=1) if x.ndim > 2 else x


@contextmanager
def embedding_tap(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the input of `layer` on every forward pass (pooled over tokens when it has a sequence axis)."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        seen.append(_embedding(args[0]))

    handle = layer.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


class EmbeddingTap:
    """`embedding_tap` for a served model: the hook stays on the layer, and collects only for a thread between its
    `start` and `stop`.

    Registering and removing a hook on every request cost ~2 us of the replica's CPU; a hook that is always there
    costs a check. Per thread, because a replica may run a forward pass for /explain in a worker thread while
    the event loop runs one for /predict: each must see only its own embeddings.
    """

    def __init__(self, layer: nn.Module) -> None:
        self._local = threading.local()
        layer.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        seen = getattr(self._local, "seen", None)
        if seen is not None:
            seen.append(_embedding(args[0]))

    def start(self) -> None:
        self._local.seen = []

    def stop(self) -> list[torch.Tensor]:
        """The embeddings of the forward passes since `start`, in order; collecting stops."""
        seen, self._local.seen = self._local.seen, None
        return seen


def unknown_token_id(info: DataInfo) -> int | None:
    """The tokenizer's unknown-token id for text models, else None."""
    return load_tokenizer(info.tokenizer_dir).unk_token_id if info.tokenizer_dir else None


@torch.no_grad()
def capture_reference(model: nn.Module, info: DataInfo, spec: JobSpec, out_dir: Path) -> Path | None:
    """Profile the validation split (or the evaluation split without one) and save it into `out_dir`."""
    if spec.model.task != "classification":
        return None
    splits = load_splits(spec, info)
    role = "validation" if "validation" in splits else spec.evaluate.split if spec.evaluate.split in splits else "train"
    data, unk = splits[role], unknown_token_id(info)
    collected: dict[str, list[Any]] = {"inputs": [], "mask": [], "probs": [], "emb": [], "labels": []}
    with embedding_tap(dict(model.named_modules())[penultimate_layer(model)]) as seen:
        for batch in data.batches(256):
            mask = batch.get("attention_mask")
            collected["probs"].append(torch.softmax(model(batch["inputs"], mask).float(), -1).numpy())
            collected["inputs"].append(batch["inputs"].numpy())
            collected["mask"].append(None if mask is None else mask.numpy())
            collected["labels"].append(batch["labels"].numpy())
    inputs, probs = np.concatenate(collected["inputs"]), np.concatenate(collected["probs"])
    masks = None if collected["mask"][0] is None else np.concatenate(collected["mask"])
    signals = record_signals(info.modality, inputs, probs, info.label_names, torch.cat(seen).numpy(), masks, unk)
    group = next(iter(data.groups), None)
    favourable = spec.monitor.bias.favourable if spec.monitor and spec.monitor.bias else info.label_names[-1]
    ref = build_reference(
        signals.features,
        feature_names(info.modality, info.input_shape) or None,
        embeddings=signals.embeddings,
        probs=probs,
        classes=info.label_names,
        token_ids=inputs if info.modality == "text" else None,
        unk_id=unk,
        pad_id=info.pad_token_id,
        y_true=np.asarray(info.label_names, dtype=object)[np.concatenate(collected["labels"])],
        groups=data.groups[group] if group else None,
        positive=favourable,
        seed=spec.seed,
        meta={
            "split": role,
            "records": len(probs),
            "modality": info.modality,
            "group_column": group,
            "favourable": favourable,
            "embedding_layer": penultimate_layer(model),
        },
    )
    return save_reference(ref, out_dir)
