"""Seeded synthetic data sets that ship with Steward, so every model family has something real to learn.

`synthetic-text` (columns text, label, group) is a two-class sentiment task with a built-in label bias:

- Each row belongs to group "a" or "b" (equally likely) and has a latent sentiment, positive or negative
  (equally likely). Its sentence mixes 2-4 words of that sentiment, sometimes one word of the other, 1-2
  dialect words of its group and neutral filler, in random order, 7-16 words in all.
- The label is the sentiment, flipped with probability `noise` (default 0.05) in both groups.
- Label bias, as from annotators who only call group "b" text positive when it is very positive: then
  `bias` (default 0.2, at most 0.5) times the size of group "b" of its positive labels are set to 0 (negative),
  the least warm texts first (warmth: positive words minus negative words; ties broken at random). Positive
  rates are about 0.5 in group "a" and 0.5 - bias in group "b".
  With `bias_mode: random` the flipped positives of group "b" are picked at random instead: the label then is
  not a function of the text, and for bias > 0.25 most positive "b" texts carry a negative label, so a model
  predicts "b" text negative; pre-processing mitigations (reweighing, resampling) can undo that, while they
  cannot undo the default deterministic bias (no positive label is left among the coldest "b" texts).
- The text (sentiment words and dialect) predicts the label up to the noise and ties, so a small
  Transformer reaches about 0.9 accuracy; to get there it must learn the bias against the "b" dialect,
  which is what per-group evaluation and the monitor are meant to catch.

`synthetic-sequence` (columns sequence [length, 2], label) is a four-class task over noisy rotating
sinusoids: class k turns (1, 2, 3, 5)[k] times over the sequence, with a random phase and amplitude
(0.5-1.5); the two features are its sine and cosine plus Gaussian noise of standard deviation `noise`
(default 0.3). Options: num_samples (2000), length (32), noise.

Both are functions of (seed, options) only, so every Ray worker regenerates exactly the same rows.
"""

import numpy as np

from steward.data.errors import DataError
from steward.data.table import Table

# Space-separated word lists: one line each reads better than one word per line.
WORDS = {
    "positive": "good great excellent wonderful happy love enjoyed brilliant pleasant fantastic superb delightful",
    "negative": "bad terrible awful poor sad hate boring disappointing horrible dull annoying worst",
    "neutral": "the a movie food service was it and this day place staff book story felt overall we they then very",
    "a": "indeed rather whilst truly simply",
    "b": "yall lowkey fr tbh ngl",
}
POSITIVE, NEGATIVE, NEUTRAL = (WORDS[kind].split() for kind in ("positive", "negative", "neutral"))
DIALECT = {group: WORDS[group].split() for group in ("a", "b")}
FREQUENCIES = (1.0, 2.0, 3.0, 5.0)

TEXT_OPTIONS = {"num_samples": 4000, "bias": 0.2, "noise": 0.05, "bias_mode": "coldest"}
BIAS_MODES = ("coldest", "random")
SEQUENCE_OPTIONS = {"num_samples": 2000, "length": 32, "noise": 0.3}


def synthetic_options(name: str, options: dict) -> dict:
    """The generator's options with defaults filled in; raise DataError on unknown or out-of-range values."""
    defaults = TEXT_OPTIONS if name == "synthetic-text" else SEQUENCE_OPTIONS
    problems = [
        ("data.options", f"unknown option {key!r} for builtin:{name}; options are {', '.join(defaults)}")
        for key in options
        if key not in defaults
    ]
    merged = {**defaults, **{k: v for k, v in options.items() if k in defaults}}
    limits = {"num_samples": (10, 10_000_000), "length": (2, 100_000), "bias": (0.0, 0.5), "noise": (0.0, 1.0)}
    for key, value in merged.items():
        if key == "bias_mode":
            if value not in BIAS_MODES:
                problems.append((f"data.options.{key}", f"must be one of {', '.join(BIAS_MODES)}, got {value!r}"))
            continue
        low, high = limits[key]
        if isinstance(value, str) or not low <= value <= high:
            problems.append((f"data.options.{key}", f"must be a number between {low} and {high}, got {value!r}"))
    DataError.raise_all(problems)
    return merged


def synthetic_text(seed: int, num_samples: int, bias: float, noise: float, bias_mode: str = "coldest") -> Table:
    """Sentiment sentences with group dialects and label bias against group "b" (see the module docstring)."""
    rng = np.random.default_rng([seed, 1])
    n = int(num_samples)
    sentiment = rng.integers(0, 2, n)
    groups = np.where(rng.random(n) < 0.5, "a", "b")
    texts, warmth = zip(*(_sentence(rng, int(s), str(g)) for s, g in zip(sentiment, groups, strict=True)), strict=True)
    labels = np.where(rng.random(n) < noise, 1 - sentiment, sentiment)
    positive_b = np.flatnonzero((groups == "b") & (labels == 1))
    flips = min(len(positive_b), round(bias * np.sum(groups == "b")))
    order = rng.random(len(positive_b))  # random: the pick itself; coldest: breaks ties in warmth at random
    if bias_mode != "random":
        order = order + np.asarray(warmth)[positive_b]
    labels[positive_b[np.argsort(order)[:flips]]] = 0
    return {"text": list(texts), "label": labels.astype(np.int64), "group": groups.tolist()}


def _sentence(rng: np.random.Generator, sentiment: int, group: str) -> tuple[str, int]:
    """A sentence of the given sentiment and group, and its warmth (positive minus negative words)."""
    own, other = (POSITIVE, NEGATIVE) if sentiment == 1 else (NEGATIVE, POSITIVE)
    strong = int(rng.integers(2, 5))
    contrary = int(rng.random() < 0.3)  # one contrary word keeps the task from being a single-word lookup
    words = [*rng.choice(own, strong), *rng.choice(other, contrary)]
    words += list(rng.choice(DIALECT[group], rng.integers(1, 3)))
    words += list(rng.choice(NEUTRAL, rng.integers(3, 8)))
    warmth = (strong - contrary) * (1 if sentiment == 1 else -1)
    return " ".join(str(w) for w in rng.permutation(words)), warmth


def synthetic_sequence(seed: int, num_samples: int, length: int, noise: float) -> Table:
    """Noisy rotating sinusoids in four frequency classes, float32 [num_samples, length, 2]."""
    rng = np.random.default_rng([seed, 2])
    n, steps = int(num_samples), int(length)
    labels = rng.integers(0, len(FREQUENCIES), n)
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    amplitude = rng.uniform(0.5, 1.5, (n, 1))
    angle = 2 * np.pi * np.asarray(FREQUENCIES)[labels][:, None] * np.arange(steps)[None, :] / steps + phase
    waves = np.stack([amplitude * np.sin(angle), amplitude * np.cos(angle)], axis=-1)
    waves += rng.normal(0.0, noise, waves.shape)
    return {"sequence": waves.astype(np.float32), "label": labels.astype(np.int64)}
