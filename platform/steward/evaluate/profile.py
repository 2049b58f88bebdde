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
from steward.models.transformer import end_tokens, prompt_embedding, usable_positions
from steward.monitor.ngrams import NgramSet
from steward.monitor.reference import PREDICTED_CLASS, build_reference, feature_profile, save_reference
from steward.monitor.signals import OUTPUT_FEATURES, feature_names, generation_signals, record_signals
from steward.spec import JobSpec
from steward.spec.monitor import LeakSpec
from steward.spec.serve import GenerationSpec

# Validation texts whose first halves prompt a language model's reference completions: enough for the histograms and
# the MMD sample, few enough that generating them at training's end stays cheap.
REFERENCE_PROMPTS = 256


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
    splits = load_splits(spec, info)
    role = "validation" if "validation" in splits else spec.evaluate.split if spec.evaluate.split in splits else "train"
    if spec.model.task == "causal_lm":
        return capture_generation_reference(model, info, spec, texts(splits[role])[:REFERENCE_PROMPTS], out_dir, role)
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


def texts(split: Any) -> list[list[int]]:
    """The token ids of each text of a split, without padding."""
    out: list[list[int]] = []
    for batch in split.batches(256):
        mask = batch.get("attention_mask")
        rows = batch["inputs"].tolist()
        out += rows if mask is None else [row[: int(m.sum())] for row, m in zip(rows, mask, strict=True)]
    return out


def capture_generation_reference(
    model: nn.Module, info: DataInfo, spec: JobSpec, split: list[list[int]], out_dir: Path, role: str
) -> Path:
    """A language model's reference: each text's first half prompts a completion sampled as the endpoint samples
    by default (temperature 1, the whole vocabulary, as many tokens as serve.generation and the context allow)."""
    hf: Any = model.hf
    tokenizer = load_tokenizer(str(info.tokenizer_dir))
    eos, context = end_tokens(hf, tokenizer), usable_positions(hf.config) or spec.data.max_length
    most = (spec.serve.generation if spec.serve and spec.serve.generation else GenerationSpec()).max_new_tokens
    halves = [ids[: max(1, len(ids) // 2)] for ids in split if ids]
    prompts = [p for p in halves if p[-1] not in eos] or halves  # a one-token text's half is its end token
    generator = torch.Generator().manual_seed(spec.seed)
    rows: dict[str, list[Any]] = {k: [] for k in ("prompt", "unknown", "length", "logprob", "finish", "embedding")}
    by_length: dict[int, list[list[int]]] = {}
    for p in prompts:
        by_length.setdefault(len(p), []).append(p)
    unk = tokenizer.unk_token_id
    for length, same in sorted(by_length.items()):  # one length a batch: no padding, and one token budget
        ids = torch.tensor(same)
        out = _sample(hf, ids, min(most, context - length), eos, generator)
        rows["embedding"].append(prompt_embedding(out["hidden"], torch.ones_like(ids)).numpy())
        rows["prompt"] += [length] * len(same)
        rows["unknown"] += (ids == unk).sum(1).tolist() if unk is not None else [0] * len(same)
        for key in ("length", "logprob", "finish"):
            rows[key] += out[key]
    signals = generation_signals(
        np.asarray(rows["prompt"]),
        np.asarray(rows["unknown"]),
        np.asarray(rows["length"]),
        np.asarray(rows["logprob"]),
        rows["finish"],
        np.concatenate(rows["embedding"]),
    )
    ref = build_reference(
        signals.features,
        OUTPUT_FEATURES,
        embeddings=signals.embeddings,
        token_ids=prompts,
        unk_id=unk if unk is not None else -1,
        seed=spec.seed,
        meta={"split": role, "records": len(prompts), "modality": "text", "task": "causal_lm"},
    )
    ref.predictions = {PREDICTED_CLASS: feature_profile(signals.predicted, PREDICTED_CLASS, kind="categorical")}
    return save_reference(ref, out_dir)


def _sample(hf: Any, ids: torch.Tensor, budget: int, eos: frozenset[int], generator: torch.Generator) -> dict:
    """Sample up to `budget` tokens after each row of `ids` (temperature 1), stopping a row at an end token: its
    length, summed log-probability, finish reason ("stop" or "length") and the prompt's last-layer states."""
    out = hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, output_hidden_states=True)
    hidden, cache, logits = out.hidden_states[-1], out.cache, out.logits[:, -1].float()
    n = len(ids)
    length, logprob = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.float64)
    done = torch.zeros(n, dtype=torch.bool)
    finish = ["length"] * n
    ends = torch.tensor(sorted(eos))
    for step in range(budget):
        probs = torch.softmax(logits, -1)
        token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        live = ~done
        length += live.long()
        logprob += torch.where(live, probs.gather(1, token[:, None])[:, 0].log().double(), 0.0)
        stopped = live & torch.isin(token, ends)
        for row in stopped.nonzero()[:, 0].tolist():
            finish[row] = "stop"
        done |= stopped
        if bool(done.all()) or step == budget - 1:
            break
        out = hf(input_ids=token[:, None], cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1].float()
    return {"length": length.tolist(), "logprob": logprob.tolist(), "finish": finish, "hidden": hidden}


def save_training_ngrams(info: DataInfo, spec: JobSpec, model_dir: Path) -> Path | None:
    """A causal LM's training n-grams (monitor.ngrams) saved beside its model, for the regurgitation check."""
    if spec.model.task != "causal_lm":
        return None
    train = load_splits(spec, info).get("train")
    if train is None:  # a streamed train split is read once by training and never held: no set to build
        return None
    leaks = spec.monitor.leaks if spec.monitor and spec.monitor.leaks else LeakSpec()
    return NgramSet.build(texts(train), leaks.ngram).save(model_dir)
