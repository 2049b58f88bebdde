"""Where a request's time goes inside a replica, sent back as a W3C `Server-Timing` header (browsers' dev tools and
benchmarks/serve_overhead.py read it): what the client waited beyond their sum is the proxy and the network.

Phases: parse (read, JSON, validation), prepare (inputs checked and converted), wait (for a batch to fill and the
forward thread to be free), encode (tokenizing text, per batch), forward (the model), reply (building and
serializing the answer), monitor (queueing the records for the monitor).
"""

import time


class Timing:
    """Phase durations of one request, each measured from the end of the one before."""

    def __init__(self) -> None:
        self.at = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        """`phase` ends now: it took the time since the last mark (or the request's start)."""
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.at
        self.at = now

    def split(self, phase: str, **parts: float) -> None:
        """Move `parts` (seconds measured elsewhere, e.g. inside a batched forward pass) out of `phase`."""
        for name, seconds in parts.items():
            self.phases[phase] -= seconds
            self.phases[name] = self.phases.get(name, 0.0) + seconds

    def header(self) -> str:
        return ", ".join(f"{phase};dur={seconds * 1000:.3f}" for phase, seconds in self.phases.items())


def parse_header(value: str) -> dict[str, float]:
    """Milliseconds per phase from a `Server-Timing` header value."""
    phases = {}
    for entry in value.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            if param.startswith("dur="):
                phases[name] = float(param[4:])
    return phases
