"""Raw instances -> per-instance explanation records: one path for `steward explain` and POST /explain."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from steward.data import DataInfo, encode_instances
from steward.data.tokenizer import load_tokenizer
from steward.errors import StewardError
from steward.explain.baselines import make_baseline
from steward.explain.integrated import Attributions, integrated_gradients
from steward.spec.explain import ExplainSpec, resolve_baseline

# An explanation counts as converged when its delta is within 5% of F(x) - F(baseline), or 1e-3 absolute:
# a saturating model (BERT's tanh pooler) can jump within a sliver of the path and need many more steps.
CONVERGED_RELATIVE, CONVERGED_ABSOLUTE = 0.05, 1e-3


def target_ids(target: str | None, info: DataInfo, count: int) -> Tensor | None:
    """Class ids of the label `target` for `count` instances, or None (explain each predicted class)."""
    if target is None:
        return None
    if target not in info.label_names:
        raise StewardError(f"target: {target!r} is not a label of this model; labels are {info.label_names[:20]}")
    return torch.full((count,), info.label_names.index(target), dtype=torch.int64)


def explain_instances(
    model: nn.Module,
    info: DataInfo,
    cfg: ExplainSpec,
    instances: Sequence[Any],
    max_length: int,
    *,
    target: str | None = None,
    n_steps: int | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """IG explanations of raw `instances` (encoded as training encoded them); returns (records, baseline used).

    Each record holds the target label, F(x), F(baseline), the convergence delta, and the attributions: a
    [H, W] map per image, [T, F] per sequence (plus per-step and per-feature sums), one value per real token.
    Raises StewardError: a bad target, a baseline that does not fit, or (DataError) a bad instance.
    """
    inputs, mask = encode_instances(instances, info, max_length)
    baseline = resolve_baseline(cfg.baseline, info.modality)
    tokenizer = load_tokenizer(info.tokenizer_dir) if info.modality == "text" and info.tokenizer_dir else None
    specials = [i for i in (tokenizer.all_special_ids if tokenizer else []) if i != info.pad_token_id]
    baselines = make_baseline(
        inputs, baseline, info.modality, sigma=cfg.blur_sigma, pad_token_id=info.pad_token_id, keep_ids=specials
    )
    result = integrated_gradients(
        model,
        inputs,
        baselines,
        attention_mask=mask,
        target=target_ids(target, info, len(inputs)),
        n_steps=n_steps or cfg.n_steps,
        internal_batch_size=cfg.internal_batch_size,
        output=cfg.output,
    )
    records = []
    for i in range(len(inputs)):
        record = _summary(result, i, info)
        if tokenizer is not None and mask is not None:
            real = mask[i].bool()
            record["tokens"] = tokenizer.convert_ids_to_tokens(inputs[i][real].tolist())
            record["attributions"] = result.values[i][real.numpy()].tolist()
        else:
            record |= _numeric_attributions(result.values[i], info.modality)
        records.append(record)
    return records, baseline


def _summary(result: Attributions, i: int, info: DataInfo) -> dict[str, Any]:
    relative = float(result.relative_delta[i])
    return {
        "target": info.label_names[int(result.target[i])],
        "target_id": int(result.target[i]),
        "score": float(result.score[i]),
        "baseline_score": float(result.baseline_score[i]),
        "attribution_sum": float(result.values[i].sum()),
        "delta": float(result.delta[i]),
        "relative_delta": None if np.isnan(relative) else relative,
        "converged": bool(abs(result.delta[i]) <= CONVERGED_ABSOLUTE or relative <= CONVERGED_RELATIVE),
    }


def _numeric_attributions(values: np.ndarray, modality: str) -> dict[str, Any]:
    if modality == "image":
        return {"attributions": values.tolist()}
    # Sequences [T, F]: the sums say which time steps and which features mattered, at a glance.
    return {
        "attributions": values.tolist(),
        "per_step": values.sum(axis=1).tolist(),
        "per_feature": values.sum(axis=0).tolist(),
    }
