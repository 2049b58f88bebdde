"""Explanations: Integrated Gradients (Captum) for CNN, LSTM and Transformer models, permutation importance.

`explain_instances` serves both `steward explain RUN` (`run.py`, which also writes the artifacts) and
POST /explain (`steward.serve.explain`). No Ray here.
"""

from steward.explain.explainer import explain_instances
from steward.explain.integrated import Attributions, integrated_gradients
from steward.explain.permutation import permutation_importance

__all__ = ["Attributions", "explain_instances", "integrated_gradients", "permutation_importance"]
