"""Evaluation of a saved (consolidated) model: overall and per-group metrics, no DeepSpeed needed."""

from steward.evaluate.metrics import compute_metrics
from steward.evaluate.run import evaluate, evaluate_model, load_servable

__all__ = ["compute_metrics", "evaluate", "evaluate_model", "load_servable"]
