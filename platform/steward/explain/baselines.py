"""Integrated Gradients baselines: the "absence of signal" each attribution is measured against."""

from collections.abc import Iterable

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import Tensor

from steward.errors import StewardError


def make_baseline(
    inputs: Tensor,
    kind: str,
    modality: str,
    *,
    sigma: float = 2.0,
    pad_token_id: int | None = None,
    keep_ids: Iterable[int] = (),
) -> Tensor:
    """A baseline of the same shape and dtype as `inputs` (already encoded, as the model reads them).

    zeros: all zeros (a black image, a flat sequence). blur: the input smoothed by a Gaussian of `sigma`, over
    height and width for images [N, (C,) H, W] and over time for sequences [N, T, F]. pad: token ids with every
    token not in `keep_ids` (the special tokens: [CLS], [SEP]) replaced by `pad_token_id`, the text analogue
    of a black image; the attention mask stays that of the input, so only token content differs.
    Raises StewardError for a kind that does not fit the modality.
    """
    text = modality == "text"
    if kind == "pad" and text:
        if pad_token_id is None:
            raise StewardError("explain.baseline: pad needs the tokenizer's pad token, and this model's data has none")
        keep = torch.isin(inputs, torch.tensor(sorted(set(keep_ids)), dtype=inputs.dtype))
        return torch.where(keep, inputs, torch.full_like(inputs, pad_token_id))
    if kind == "zeros" and not text:
        return torch.zeros_like(inputs)
    if kind == "blur" and not text:
        return _blurred(inputs, modality, sigma)
    fits = "pad" if text else "zeros or blur"
    raise StewardError(f"explain.baseline: {kind} does not fit {modality} inputs; use {fits}")


def _blurred(inputs: Tensor, modality: str, sigma: float) -> Tensor:
    array = inputs.detach().cpu().numpy()
    # One sigma per axis: never smooth across instances, channels or (for sequences) distinct features.
    if modality == "image":
        sigmas = [0.0] * (array.ndim - 2) + [sigma, sigma]
    else:
        sigmas = [0.0, sigma] + [0.0] * (array.ndim - 2)
    smooth = gaussian_filter(array, sigma=sigmas, mode="nearest")
    return torch.from_numpy(np.ascontiguousarray(smooth, dtype=np.float32)).to(inputs.device)
