"""`Windows` cuts a stream into windows by record count or by time, sliding by `step`: a window is the merge of its
last size/step panes (`WindowState`s), so sliding costs one merge per step rather than re-reading records.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from steward.monitor.window_state import WindowState


class Windows:
    """Windows of `size` records (by="count") or seconds (by="time"), sliding by `step` (default: tumbling).

    Records go into the current pane of `step`; when it closes, the next pane inherits its pending predictions and
    labels, and once `size / step` panes have closed each close emits the merge of the last ones. Time panes are
    aligned to multiples of `step` since the epoch, so replicas' panes line up; idle time emits empty windows
    (at most `size / step` + 1 of them, however long the idle period).
    """

    def __init__(
        self,
        new_state: Callable[[], WindowState],
        size: float,
        step: float | None = None,
        by: Literal["count", "time"] = "count",
    ) -> None:
        step = size if step is None else step
        problems = []
        if by not in ("count", "time"):
            problems.append(f"`by` must be 'count' or 'time', got {by!r}")
        if size <= 0 or step <= 0 or step > size:
            problems.append(f"need 0 < step <= size, got size={size}, step={step}")
        elif not math.isclose(size / step, round(size / step)):
            problems.append(f"`size` ({size}) must be a whole number of steps ({step})")
        if problems:
            raise ValueError("; ".join(problems))
        self.new_state, self.size, self.step, self.by = new_state, size, step, by
        self._panes: deque[WindowState] = deque(maxlen=round(size / step))
        self.pane = new_state()
        self._pane_id: int | None = None

    def add(self, t: float | None = None, **record: Any) -> list[WindowState]:
        """Add one record (arguments of `WindowState.add`); returns the windows this closed, oldest first."""
        t = time.time() if t is None else t
        closed = self._advance(t)
        self.pane.add(t=t, **record)
        if self.by == "count" and self.pane.n >= self.step:
            closed += self._close()
        return closed

    def add_state(self, delta: WindowState, t: float | None = None) -> list[WindowState]:
        """Merge a replica's delta into the current pane (the monitor's path). Count panes close at the first delta
        that reaches `step`, so a pane may hold up to step + one delta's records."""
        closed = self._advance(time.time() if t is None else t)
        self.pane.update(delta)
        if self.by == "count" and self.pane.n >= self.step:
            closed += self._close()
        return closed

    def add_feedback(self, request_id: Any, label: Any) -> bool:
        return self.pane.add_feedback(request_id, label)

    def current(self) -> WindowState:
        """The window that will close next, so far: the open pane and the closed panes it will share a window with."""
        out = self.pane
        keep = (self._panes.maxlen or 1) - 1
        for pane in list(self._panes)[len(self._panes) - keep :] if keep else []:
            out = pane.merge(out)
        return out

    def to_dict(self, pending: bool = True) -> dict[str, Any]:
        """The open pane and the closed panes still to be emitted, as plain data (for persistence); without the
        predictions and labels waiting for their other half (all in the open pane) when not `pending`."""
        panes = [p.to_dict() for p in self._panes]
        return {"pane_id": self._pane_id, "pane": self.pane.to_dict(pending), "panes": panes}

    def restore(self, data: dict[str, Any]) -> None:
        """Continue from what `to_dict` saved (same size, step and bins)."""
        self._pane_id, self.pane = data["pane_id"], WindowState.from_dict(data["pane"])
        self._panes.clear()
        self._panes.extend(WindowState.from_dict(p) for p in data["panes"])

    @staticmethod
    def current_of(data: dict[str, Any]) -> WindowState:
        """The merge of the panes `to_dict` saved: the latest traffic, for reports."""
        out = WindowState.from_dict(data["pane"])
        for pane in data["panes"]:
            out = WindowState.from_dict(pane).merge(out)
        return out

    def _advance(self, t: float) -> list[WindowState]:
        if self.by != "time":
            return []
        pane_id = math.floor(t / self.step)
        if self._pane_id is None:
            self._pane_id = pane_id
        closed: list[WindowState] = []
        for _ in range(min(pane_id - self._pane_id, (self._panes.maxlen or 1) + 1)):
            closed += self._close()
        self._pane_id = max(self._pane_id, pane_id)
        return closed

    def _close(self) -> list[WindowState]:
        pane, self.pane = self.pane, self.pane.take_pending()
        self._panes.append(pane)
        if len(self._panes) < (self._panes.maxlen or 1):
            return []
        out = self._panes[0]
        for nxt in list(self._panes)[1:]:
            out = out.merge(nxt)
        return [out]
