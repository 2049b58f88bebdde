"""serve.output_pii: what of a completion's text a client receives when it holds personal data.

`allow` sends the text as generated; `mask` replaces each value found with its type tag (<EMAIL>); `block` ends the
completion before the first value (OpenAI's finish_reason `content_filter`). The values are found by Steward's own
recognizers (steward.data.pii), of the privacy section's entity types. A stream is scanned as it grows: its last
HOLD characters, back to a space, wait until they cannot be the start of a value still being generated.
"""

from steward.data.pii import find_spans
from steward.data.privacy import Masker
from steward.spec.privacy import PrivacySpec

# Characters of a stream held back: longer than any value the recognizers find in practice (a card or phone number, an
# e-mail address), so a value is whole when it is scanned; a longer one may go out in part before it is recognised.
HOLD = 64


class OutputGuard:
    """One completion's text under `mode`: `feed` it each generated piece, get back what the client may receive."""

    def __init__(self, mode: str, privacy: PrivacySpec) -> None:
        self.mode = mode
        self.privacy = privacy.model_copy(update={"mode": "replace", "modes": {}})
        self.masker = Masker(self.privacy)
        self.pending = ""  # generated, not yet sent

    def feed(self, piece: str, final: bool = False) -> tuple[str, bool]:
        """Add `piece` (the last one when `final`); returns the text now safe to send, and whether the completion
        is blocked (the text returned ends before the first value found, and nothing more may be sent)."""
        if self.mode == "allow":
            return piece, False
        self.pending += piece
        spans = find_spans(self.pending, self.privacy.entities, self.privacy.phone_region)
        if self.mode == "block" and spans:
            sent, self.pending = self.pending[: spans[0].start], ""
            return sent, True
        cut = len(self.pending) if final else self._safe_end(spans)
        text, _ = self.masker.mask(self.pending[:cut])
        self.pending = self.pending[cut:]
        return text, False

    def _safe_end(self, spans: list) -> int:
        """Where the text that can no longer be part of a value still growing ends: HOLD characters before the end,
        back to the space before it, and before any value reaching into the held part."""
        cut = len(self.pending) - HOLD
        for span in spans:
            if span.end > cut:
                cut = min(cut, span.start)
        if cut <= 0:
            return 0
        space = self.pending.rfind(" ", 0, cut)
        return space + 1 if space >= 0 else 0
