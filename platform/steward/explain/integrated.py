"""Integrated Gradients (Captum) for the three model families, with the convergence delta of every instance.

Images and sequences are attributed per input value (pixel; time step x feature). Text goes through the
token embedding layer (LayerIntegratedGradients: token ids are not differentiable) and each token's
attribution is the sum over its embedding dimensions, so the tokens' attributions still add up to
F(x) - F(baseline).
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients
from torch import Tensor, nn

# Below this |F(x) - F(baseline)| a relative delta means nothing: the absolute delta is reported alone.
TINY_GAP = 1e-6


@dataclass
class Attributions:
    """IG results for N instances.

    values: float32, [N, H, W] (or [N, C, H, W]) for images, [N, T, F] for sequences, [N, L] per token for text.
    delta: [N] convergence delta, sum(values) - (F(x) - F(baseline)); 0 for an exact integral.
    score, baseline_score: [N] F at the input and at the baseline; target: [N] class ids explained.
    """

    values: np.ndarray
    delta: np.ndarray
    score: np.ndarray
    baseline_score: np.ndarray
    target: np.ndarray

    @property
    def relative_delta(self) -> np.ndarray:
        """|delta| / |F(x) - F(baseline)|, NaN where that gap is too small to divide by."""
        gap = np.abs(self.score - self.baseline_score)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap > TINY_GAP, np.abs(self.delta) / gap, np.nan)


def target_output(model: nn.Module, output: str) -> Callable[..., Tensor]:
    """forward(inputs, attention_mask) -> [B, C] class probabilities (output="probability") or logits."""

    def forward(inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        logits = model(inputs, attention_mask).float()
        return torch.softmax(logits, dim=-1) if output == "probability" else logits

    return forward


def embedding_layer(model: nn.Module) -> nn.Module:
    """The token embedding a text model looks its ids up in (Hugging Face models and the LSTM's own)."""
    hf = getattr(model, "hf", None)
    if hf is not None:
        return hf.get_input_embeddings()
    embedding = getattr(model, "embedding", None)
    if isinstance(embedding, nn.Embedding):
        return embedding
    raise ValueError(f"{type(model).__name__} has no token embedding to attribute text through")


def integrated_gradients(
    model: nn.Module,
    inputs: Tensor,
    baselines: Tensor,
    *,
    attention_mask: Tensor | None = None,
    target: Tensor | None = None,
    n_steps: int = 32,
    internal_batch_size: int = 64,
    output: str = "probability",
) -> Attributions:
    """IG attributions of each instance's `target` class (default: the predicted class).

    Token ids (integer `inputs`) are attributed through the model's embedding layer; float inputs directly.
    `internal_batch_size` bounds how many interpolated inputs go through one forward/backward pass.
    """
    model.eval()
    forward = target_output(model, output)
    extra = (attention_mask,) if attention_mask is not None else None
    with torch.no_grad():
        score_all, base_all = forward(inputs, attention_mask), forward(baselines, attention_mask)
    target = score_all.argmax(-1) if target is None else target.to(torch.int64)
    text = not inputs.is_floating_point()
    method = LayerIntegratedGradients(forward, embedding_layer(model)) if text else IntegratedGradients(forward)
    values, delta = method.attribute(
        inputs,
        baselines=baselines,
        target=target,
        additional_forward_args=extra,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        return_convergence_delta=True,
    )
    if text:
        values = values.sum(-1)  # [N, L, E] -> one number per token
    rows = torch.arange(len(target))
    return Attributions(
        values=values.detach().float().numpy(),
        delta=delta.detach().float().numpy(),
        score=score_all[rows, target].numpy(),
        baseline_score=base_all[rows, target].numpy(),
        target=target.numpy(),
    )
