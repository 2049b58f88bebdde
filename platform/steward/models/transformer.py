"""Hugging Face Transformers built from a few sizes or loaded pretrained, behind one forward(inputs, mask)."""

from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from peft import PeftModel
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from steward.data.info import DataInfo
from steward.errors import StewardError
from steward.models.adapter import adapter_problems, add_adapter, merged_copy
from steward.spec.model import LoraAdapter, TransformerParams

# Architectures name the same knob differently (GPT-2: n_embd, n_layer, n_inner; DistilBERT: dim,
# hidden_dim). attribute_map covers some of it, not all: the first name the architecture has wins.
SIZE_NAMES = {
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "intermediate_size": ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim", "d_ff"),
}
# Every one of these the architecture has is set to params.dropout (GPT-2 has three, BERT two).
DROPOUT_NAMES = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "dropout",
    "attention_dropout",
    "hidden_dropout",
)
# RoBERTa-style models number positions from pad_token_id + 1, so that many table rows are never usable.
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "roberta-prelayernorm", "data2vec-text", "longformer"}
# Seeds the random frozen weights of a from-config model under an adapter (see build_transformer).
FROZEN_BASE_SEED = 0
HEADS = {
    "classification": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "causal_lm": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
}


class HFTransformer(nn.Module):
    """A Hugging Face model whose forward returns bare logits; the model itself stays at `.hf`.

    forward(inputs [B, L] token ids, attention_mask [B, L]) -> [B, num_classes] or [B, L, vocab_size].
    """

    def __init__(self, hf: PreTrainedModel | PeftModel) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits of the wrapped model."""
        return self.hf(input_ids=inputs, attention_mask=attention_mask).logits

    def checkpoint_activations(self) -> None:
        """Keep only each layer's inputs in the forward pass and recompute the rest in the backward pass.

        Non-reentrant checkpointing: gradients reach a frozen model's adapter, and ZeRO-3's parameter hooks fire
        again in the recompute.
        """
        try:
            self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        except ValueError:
            raise StewardError(
                f"train.activation_checkpointing: transformers cannot checkpoint {self.hf.config.model_type} "
                "models; set it to false"
            ) from None


def _architecture_defaults(model_type: str) -> PreTrainedConfig:
    try:
        return AutoConfig.for_model(model_type)
    except ValueError:
        raise StewardError(
            f"model.params.model_type: unknown Hugging Face architecture {model_type!r}; "
            "use one such as bert, gpt2, distilbert or llama"
        ) from None


def usable_positions(config: PreTrainedConfig) -> int | None:
    """How many tokens a sequence may hold under `config`, or None when the architecture sets no limit."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return None
    if config.model_type in OFFSET_POSITIONS:
        positions -= int(config.pad_token_id or 0) + 1
    return int(positions)


def end_tokens(hf: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end a text as training's texts ended: generation stops at any of them."""
    eos = {tokenizer.sep_token_id, tokenizer.eos_token_id, getattr(hf.generation_config, "eos_token_id", None)}
    return frozenset(int(token) for token in eos if isinstance(token, int))


def prompt_embedding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A prompt's embedding: the mean of the last layer's states (B, T, H) over its real positions (`mask` (B, T))."""
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def scratch_config(params: TransformerParams, task: str, info: DataInfo) -> PreTrainedConfig:
    """The config of a randomly initialised `params.model_type`, sized by `params` and the data."""
    defaults = _architecture_defaults(params.model_type)
    settings: dict = {}
    for knob, names in SIZE_NAMES.items():
        name = next((n for n in names if hasattr(defaults, n)), None)
        if name is None:
            raise StewardError(
                f"model.params.{knob}: {params.model_type} has no setting we recognise for it; "
                "set the architecture's own name in model.params.config_overrides"
            )
        settings[name] = getattr(params, knob)
    settings.update({name: params.dropout for name in DROPOUT_NAMES if hasattr(defaults, name)})
    settings.update(vocab_size=info.vocab_size, pad_token_id=info.pad_token_id)
    if hasattr(defaults, "max_position_embeddings"):
        # The table is as long as the data needs (plus RoBERTa's offset), not the architecture's default.
        offset = int(info.pad_token_id or 0) + 1 if params.model_type in OFFSET_POSITIONS else 0
        settings["max_position_embeddings"] = int(info.input_shape[0]) + offset
    for special in ("bos_token_id", "eos_token_id"):
        # Defaults such as GPT-2's 50256 name tokens of its own tokenizer, absent from a trained vocabulary.
        token = getattr(defaults, special, None)
        if isinstance(token, int) and info.vocab_size is not None and token >= info.vocab_size:
            settings[special] = None
    if task == "classification" and info.num_classes:
        settings["num_labels"] = info.num_classes
    settings.update(params.config_overrides)
    return AutoConfig.for_model(params.model_type, **settings)


def pretrained_config(params: TransformerParams, task: str, info: DataInfo) -> PreTrainedConfig:
    """The config of `params.pretrained` with the task head, dropout and config_overrides applied."""
    try:
        config = AutoConfig.from_pretrained(str(params.pretrained))
    except (OSError, ValueError) as error:
        raise StewardError(
            f"model.params.pretrained: cannot read a Hugging Face config from {params.pretrained!r} ({error}); "
            "give a folder holding config.json or a hub id already in the local cache"
        ) from None
    for name in DROPOUT_NAMES:
        if hasattr(config, name):
            setattr(config, name, params.dropout)
    if task == "classification" and info.num_classes:
        config.num_labels = info.num_classes
    if config.pad_token_id is None and info.pad_token_id is not None:
        # Decoder-only classifiers find each row's last token through the pad id; GPT-2 ships without one.
        config.pad_token_id = info.pad_token_id
    for name, value in params.config_overrides.items():
        setattr(config, name, value)
    return config


def resolve_config(params: TransformerParams, task: str, info: DataInfo) -> PreTrainedConfig:
    """The config `build_transformer` would use, without building weights.

    Raises StewardError naming the field: the config's own type checks reject bad config_overrides.
    """
    try:
        if params.pretrained:
            return pretrained_config(params, task, info)
        return scratch_config(params, task, info)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise StewardError(f"model.params.config_overrides: {' '.join(str(error).split())}") from None


def _auto_class(task: str) -> Any:
    return AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification


def build_transformer(
    params: TransformerParams,
    task: str,
    info: DataInfo,
    config_dir: str | Path | None = None,
    adapter: LoraAdapter | None = None,
) -> HFTransformer:
    """A classification or causal-LM Transformer for text data, in fp32.

    From scratch (params.pretrained unset): `scratch_config` with random weights. Pretrained: the weights of
    params.pretrained with a new head when the label count differs; params.dropout and config_overrides
    apply, the sizes do not. With `adapter` the model trains only a LoRA adapter (see models/adapter.py). With
    `config_dir` (a folder holding a saved config.json) the architecture is rebuilt from that config with random
    weights, for the caller to load saved weights into; a saved model has its adapter merged, so none is added.
    """
    auto = _auto_class(task)
    # dtype is explicit because from_config follows config.dtype, which a bf16 run may have saved.
    if config_dir is not None:
        return HFTransformer(auto.from_config(AutoConfig.from_pretrained(str(config_dir)), dtype=torch.float32))
    config = resolve_config(params, task, info)
    if not params.pretrained:
        with torch.random.fork_rng(enabled=adapter is not None):
            if adapter is not None:
                # The frozen weights under an adapter are never checkpointed: a resumed run rebuilds the same ones.
                torch.manual_seed(FROZEN_BASE_SEED)
            hf = auto.from_config(config, dtype=torch.float32)
    else:
        hf = auto.from_pretrained(
            params.pretrained,
            config=config,
            dtype=torch.float32,
            # A checkpoint fine-tuned for another label count gets a new head instead of an error.
            ignore_mismatched_sizes=task == "classification",
        )
    return HFTransformer(add_adapter(hf, adapter, task) if adapter is not None else hf)


def merged_transformer(
    model: HFTransformer, state_dict: dict[str, Tensor], adapter: LoraAdapter, task: str
) -> HFTransformer:
    """`model` (adapted) as a plain HFTransformer holding `state_dict` with the adapter merged into its weights."""
    return HFTransformer(merged_copy(model.hf, _auto_class(task), state_dict, "hf.", adapter, task))


def transformer_problems(
    params: TransformerParams, task: str, info: DataInfo, adapter: LoraAdapter | None = None
) -> list[str]:
    """Why `params` (and `adapter`) cannot be built for `info`, as "<field>: ..." strings."""
    if info.modality != "text":
        return []  # the family/modality mismatch is reported once, by the registry
    if not info.vocab_size:
        return ["data.tokenizer: text data has no vocab_size; a Transformer needs it to size its embedding"]
    try:
        config = resolve_config(params, task, info)
    except StewardError as error:
        return [str(error)]
    # A pretrained model's limits come from its checkpoint; a new one's only from config_overrides.
    source = "model.params.pretrained" if params.pretrained else "model.params.config_overrides"
    problems = []
    if config.model_type not in HEADS[task]:
        field = source if params.pretrained else "model.params.model_type"
        problems.append(
            f"{field}: {config.model_type} has no {task} head in transformers; "
            "use e.g. bert for classification or gpt2 for causal_lm"
        )
    positions, max_length = usable_positions(config), int(info.input_shape[0])
    if positions is not None and positions < max_length:
        field = source if params.pretrained else f"{source}.max_position_embeddings"
        problems.append(
            f"{field}: the model holds {positions} positions but data.max_length is {max_length}; "
            f"set data.max_length <= {positions}"
        )
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and vocab < info.vocab_size:
        field = source if params.pretrained else f"{source}.vocab_size"
        problems.append(
            f"{field}: the tokenizer has {info.vocab_size} tokens but the model's embedding only {vocab}; "
            "use the tokenizer saved with the pretrained model, or a larger vocab_size"
        )
    if adapter is not None and not problems:
        problems += adapter_problems(config, _auto_class(task), adapter, task)
    return problems
