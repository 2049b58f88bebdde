"""Which of each replica's numbered pushes the monitor has merged and saved, so none is lost or counted twice.

Replicas number their pushes from 1 and keep every push the monitor has not saved both ways (the statistics in
state.json, the predictions waiting for a label in pending.json). A monitor restarted from those saves asks each
replica, at its first push, for the pushes it may lack; a push already merged is skipped, except for its waiting
predictions when only the statistics had been saved. Ray runs an async actor's calls in no set order, so pushes may
arrive out of order. Pure bookkeeping: no Ray, no windows.
"""

from __future__ import annotations

from typing import Any


class PushLedger:
    """Per replica: all pushes up to `applied` are merged, and those in `ahead`; `saved_stats` / `saved_pending`
    are what `applied` was at the last save of the statistics / of the waiting predictions."""

    def __init__(self) -> None:
        self.applied: dict[str, int] = {}
        self.ahead: dict[str, set[int]] = {}
        self.saved_stats: dict[str, int] = {}
        self.saved_pending: dict[str, int] = {}
        self.heard: set[str] = set()  # replicas that have pushed since this ledger was made
        self.resync: dict[str, int] = {}  # replica -> the first of its pushes asked for again, until they come

    def resend_from(self, replica: str, kept_from: int, first: int) -> int | None:
        """The first push to ask `replica` for again before merging a push starting at `first` (None: go on).

        At a replica's first push, those it still holds (from `kept_from`) past the last save of the waiting
        predictions may be missing here; until a push starting with them comes, every push is answered so.
        """
        if replica not in self.heard:
            self.heard.add(replica)
            if (oldest := max(kept_from, self.saved_pending.get(replica, 0) + 1)) < first:
                self.resync[replica] = oldest
        start = self.resync.get(replica)
        if start is None or first <= start:
            self.resync.pop(replica, None)
            return None
        return start

    def take(self, replica: str, seq: int) -> bool:
        """Whether push `seq` of `replica` is new, marking it merged."""
        low, ahead = self.applied.get(replica, 0), self.ahead.setdefault(replica, set())
        if seq <= low or seq in ahead:
            return False
        ahead.add(seq)
        while low + 1 in ahead:
            low += 1
            ahead.remove(low)
        self.applied[replica] = low
        return True

    def pending_lost(self, replica: str, seq: int) -> bool:
        """Whether an already merged push's waiting predictions were not saved (a restart lost them)."""
        return seq > self.saved_pending.get(replica, 0)

    def saved(self, replica: str) -> int:
        """The last push of `replica` saved both ways: the replica may forget it and those before."""
        return min(self.saved_stats.get(replica, 0), self.saved_pending.get(replica, 0))

    def mark_saved(self, applied: dict[str, int], pending: bool) -> None:
        """`applied` as it was when a save began has been written (with the waiting predictions if `pending`)."""
        self.saved_stats = applied
        if pending:
            self.saved_pending = applied

    def to_dict(self) -> dict[str, Any]:
        ahead = {replica: sorted(seqs) for replica, seqs in self.ahead.items() if seqs}
        return {"applied": dict(self.applied), "ahead": ahead}

    def restore(self, stats: dict[str, Any], pending: dict[str, Any] | None) -> None:
        """Take what the saves held: state.json's `to_dict`, and pending.json's `applied` when there is one."""
        self.applied, self.saved_stats = dict(stats.get("applied", {})), dict(stats.get("applied", {}))
        self.ahead = {replica: set(seqs) for replica, seqs in stats.get("ahead", {}).items()}
        self.saved_pending = dict(pending.get("applied", {})) if pending is not None else {}
