"""What one served record contributes to the monitor, computed the same way at training's end and at serving.

Pure numpy: the caller passes the model's inputs (as arrays), class probabilities and penultimate-layer embeddings.
Sequence inputs are summarised per record by each feature's mean over time steps; text by its token length and the
share of unknown tokens; images by their embeddings only. A language model's record is one completion: its prompt's
length, unknown-token share and embedding, its output's length and mean token log-probability (the model's own
confidence in what it wrote), and why it ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from steward.monitor.reference import CONFIDENCE, TEXT_LENGTH, TEXT_UNK_RATE

OUTPUT_LENGTH, OUTPUT_LOGPROB = "output.length", "output.logprob"
OUTPUT_FEATURES = [OUTPUT_LENGTH, OUTPUT_LOGPROB]  # a language model's per-record "features"


def feature_names(modality: str, input_shape: tuple[int, ...]) -> list[str]:
    """Names of the per-record input features: one per sequence feature, none for images and text."""
    return [f"feature_{i}" for i in range(input_shape[-1])] if modality == "sequence" else []


@dataclass
class Signals:
    """Per-record signals of n records: numeric values by name, predicted labels, embeddings, feature rows."""

    numeric: dict[str, np.ndarray] = field(default_factory=dict)
    predicted: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))
    embeddings: np.ndarray | None = None
    features: np.ndarray | None = None

    def rows(self, names: list[str]) -> np.ndarray:
        """(n, len(names)) numeric values in `names` order (NaN where a signal is absent)."""
        n = len(self.predicted)
        return np.column_stack([self.numeric.get(k, np.full(n, np.nan)) for k in names]) if names else np.empty((n, 0))


def record_signals(
    modality: str,
    inputs: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    embeddings: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    unk_id: int | None = None,
) -> Signals:
    """The monitor's view of a batch: inputs (n, ...) as the model saw them, probabilities (n, C), label names."""
    probs = np.asarray(probs, dtype=float)
    out = Signals(predicted=np.asarray(labels, dtype=object)[probs.argmax(1)], embeddings=embeddings)
    out.numeric[CONFIDENCE] = probs.max(1)
    if modality == "sequence":
        out.features = np.asarray(inputs, dtype=float).mean(axis=1)
        out.numeric.update(zip(feature_names(modality, inputs.shape[1:]), out.features.T, strict=True))
    if modality == "text" and attention_mask is not None:
        mask = np.asarray(attention_mask).astype(bool)
        lengths = mask.sum(1).astype(float)
        unknown = ((np.asarray(inputs) == unk_id) & mask).sum(1) if unk_id is not None else np.zeros(len(mask))
        out.numeric[TEXT_LENGTH] = lengths
        out.numeric[TEXT_UNK_RATE] = np.divide(unknown, lengths, out=np.zeros_like(lengths), where=lengths > 0)
    return out


def generation_signals(
    prompt_lengths: np.ndarray,
    prompt_unknown: np.ndarray,
    output_lengths: np.ndarray,
    logprob_sums: np.ndarray,
    finish: list[str],
    embeddings: np.ndarray | None = None,
) -> Signals:
    """The monitor's view of n completions: prompt and output token counts, unknown prompt tokens, the sum of the
    generated tokens' log-probabilities, finish reasons, prompt embeddings (n, d)."""
    prompts, outputs = np.asarray(prompt_lengths, dtype=float), np.asarray(output_lengths, dtype=float)
    logprob = np.divide(logprob_sums, outputs, out=np.full_like(outputs, np.nan), where=outputs > 0)
    out = Signals(predicted=np.asarray(finish, dtype=object), embeddings=embeddings)
    out.features = np.column_stack([outputs, logprob])
    out.numeric.update(zip(OUTPUT_FEATURES, out.features.T, strict=True))
    out.numeric[TEXT_LENGTH] = prompts
    out.numeric[TEXT_UNK_RATE] = np.divide(prompt_unknown, prompts, out=np.zeros_like(prompts), where=prompts > 0)
    return out
