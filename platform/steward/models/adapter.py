"""LoRA adapters through peft: which weights train, how many, and the merged model that is saved and served.

A model with an adapter is the Hugging Face model wrapped in a peft model: the chosen Linear layers gain low-rank
updates, a classifier's head is trained whole (peft's modules_to_save), and every other weight is frozen. The
optimizer and the checkpoints see only what trains; the saved model has the updates merged into its weights, so
serving, int8 quantization, evaluation and the monitor's reference treat it as any other model.
"""

import warnings
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import ModulesToSaveWrapper
from peft.utils.error import NoMatchingPeftModuleError
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.configuration_utils import PreTrainedConfig

from steward.errors import StewardError
from steward.spec.model import LoraAdapter

TASK_TYPES = {"classification": TaskType.SEQ_CLS, "causal_lm": TaskType.CAUSAL_LM}
# The peft model's own name for the one adapter every steward model has.
ADAPTER_NAME = "default"


def lora_config(adapter: LoraAdapter, task: str) -> LoraConfig:
    """The peft LoraConfig for `adapter`; peft itself adds a classifier's head to the weights that train."""
    targets = adapter.target_modules
    return LoraConfig(
        task_type=TASK_TYPES[task],
        r=adapter.r,
        # peft annotates lora_alpha as an int but scales by lora_alpha / r in floating point: a float is exact
        lora_alpha=adapter.alpha,  # type: ignore[arg-type]
        lora_dropout=adapter.dropout,
        # peft reads a bare string as one regular expression or its "all-linear" wildcard, a list as names
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias="none",
    )


def add_adapter(hf: PreTrainedModel, adapter: LoraAdapter, task: str) -> PeftModel:
    """`hf` wrapped in a peft model: LoRA updates on the target layers, every other weight frozen.

    Raises StewardError when no layer matches model.adapter.target_modules or the architecture has no default.
    """
    try:
        with warnings.catch_warnings():
            # GPT-2 stores its Linear layers transposed (Conv1D); peft notices and transposes its updates itself.
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
            return get_peft_model(hf, lora_config(adapter, task), adapter_name=ADAPTER_NAME)
    except (NoMatchingPeftModuleError, ValueError) as error:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in hf.named_modules() if _is_linear(module)})
        raise StewardError(
            f"model.adapter.target_modules: {' '.join(str(error).split())[:300]}; "
            f"name Linear layers of this model, e.g. {linear[:8]}, or [all-linear]"
        ) from None


def adapter_problems(config: PreTrainedConfig, auto: Any, adapter: LoraAdapter, task: str) -> list[str]:
    """Why `adapter` cannot be added to the model `config` describes, checked on weights that take no memory."""
    with torch.device("meta"):
        hf = auto.from_config(config)
    try:
        add_adapter(hf, adapter, task)
    except StewardError as error:
        return [str(error)]
    return []


def adapter_summary(model: nn.Module, adapter: LoraAdapter) -> dict[str, Any]:
    """What was adapted and how much of the model trained, for model.json and the model card (`model` holds the peft
    model at `.hf`)."""
    hf = _peft(getattr(model, "hf", None))
    targets = getattr(hf.peft_config[ADAPTER_NAME], "target_modules", None)
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)
    total = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    return {
        **adapter.model_dump(mode="json"),
        "target_modules": sorted(targets) if isinstance(targets, (set, list)) else None,
        "trained_whole": sorted(
            name.rsplit(".", 1)[-1] for name, module in hf.named_modules() if isinstance(module, ModulesToSaveWrapper)
        ),
        "trainable_parameters": trainable,
        "parameters_while_training": total,
        "trainable_share": trainable / total,
    }


def merged_copy(
    hf: nn.Module, auto: Any, state_dict: dict[str, Tensor], prefix: str, adapter: LoraAdapter, task: str
) -> PreTrainedModel:
    """A plain model of `hf`'s architecture holding `state_dict` (keys under `prefix`) with the updates merged in.

    It is built afresh on the CPU: the live `hf` may be partitioned by ZeRO-3, and merging must not touch it.
    """
    base_config = _peft(hf).get_base_model().config
    fresh = add_adapter(auto.from_config(base_config, dtype=torch.float32), adapter, task)
    own = {name[len(prefix) :]: tensor for name, tensor in state_dict.items() if name.startswith(prefix)}
    fresh.load_state_dict(own, strict=True)
    return fresh.merge_and_unload().eval()


def _peft(hf: object) -> PeftModel:
    if not isinstance(hf, PeftModel):
        raise ValueError(f"expected a model with an adapter (a peft model), got {type(hf).__name__}")
    return hf


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
