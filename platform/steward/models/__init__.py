"""Models: CNN, LSTM and Hugging Face Transformers as plain nn.Modules (no Ray, no DeepSpeed).

Every model's forward(inputs, attention_mask=None) returns logits; `store` saves and loads the servable form.
"""

from steward.models.registry import build_model, check_fits, count_parameters, load_trained_state, task_loss
from steward.models.store import load_model, save_model

__all__ = [
    "build_model",
    "check_fits",
    "count_parameters",
    "load_model",
    "load_trained_state",
    "save_model",
    "task_loss",
]
