"""A language model replica's side of monitoring: each finished completion queued as a record, counted at push time
into the window state the classifier's records go to (steward.serve.monitoring pushes it).

A record's signals are its prompt's length, unknown-token share and embedding, its output's length and mean token
log-probability, and its finish reason (`monitor.signals.generation_signals`, as training's reference computed them);
its totals are the personal-data values in the generated text, by type, and its n-grams found in the training text.
The request path only appends; scanning and hashing happen when a push counts the queue.
"""

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steward.data.pii import find_spans
from steward.monitor.bins import Bins
from steward.monitor.checks import NGRAMS_FOUND, NGRAMS_JUDGED, PII_TOTAL
from steward.monitor.ngrams import load_ngrams
from steward.monitor.reference import PREDICTED_CLASS
from steward.monitor.signals import generation_signals
from steward.monitor.window_state import WindowState
from steward.serve.monitoring import Cut, Queue
from steward.spec.monitor import MonitorSpec
from steward.spec.privacy import PrivacySpec


@dataclass(frozen=True)
class Completion:
    """One finished completion as the monitor sees it."""

    prompt: list[int]
    generated: list[int]
    logprob: float  # the sum over the generated tokens
    finish: str
    text: str  # as generated, before serve.output_pii masked or blocked it
    embedding: np.ndarray | None
    t: float = field(default_factory=time.time)


class CompletionQueue(Queue):
    """A language model's finished completions."""

    def __init__(self, bins: Bins, cfg: MonitorSpec, run_dir: Path, privacy: PrivacySpec, unk: int | None) -> None:
        super().__init__()
        self.bins, self.privacy, self.unk = bins, privacy, unk
        self.leaks = cfg.leaks is not None
        self.ngrams = load_ngrams(run_dir / "model") if self.leaks else None

    def append(self, completion: Completion) -> None:  # type: ignore[override]
        self.items.append(completion)
        self.queued += 1

    def count_into(self, state: WindowState, cut: Cut | None = None) -> None:
        cut = self.cut() if cut is None else cut
        state.invalid += cut.invalid
        items: list[Completion] = cut.items
        if not items:
            return
        embeddings = [c.embedding for c in items]
        signals = generation_signals(
            np.array([len(c.prompt) for c in items]),
            np.array([c.prompt.count(self.unk) if self.unk is not None else 0 for c in items]),
            np.array([len(c.generated) for c in items]),
            np.array([c.logprob for c in items]),
            [c.finish for c in items],
            None if any(e is None for e in embeddings) else np.stack(embeddings),  # type: ignore[arg-type]
        )
        samples = {"features": signals.features}
        if signals.embeddings is not None:
            samples["embedding"] = signals.embeddings
        state.add_batch(
            signals.predicted,
            features=signals.rows(self.bins.names),
            samples=samples,
            t=(items[0].t, items[-1].t),
            categories={PREDICTED_CLASS: signals.predicted} if PREDICTED_CLASS in self.bins.categorical else None,
            totals=self._leaks(items) if self.leaks else None,
        )

    def _leaks(self, items: list[Completion]) -> dict[str, int]:
        """Personal-data values by type (every scanned type, zeros too) and n-grams judged and found."""
        found = Counter(
            s.entity for c in items for s in find_spans(c.text, self.privacy.entities, self.privacy.phone_region)
        )
        totals = {f"{PII_TOTAL}{entity}": found[entity] for entity in self.privacy.entities}
        if self.ngrams is not None:
            counts = [self.ngrams.count(c.generated) for c in items]
            totals[NGRAMS_FOUND] = sum(f for f, _ in counts)
            totals[NGRAMS_JUDGED] = sum(j for _, j in counts)
        return totals
