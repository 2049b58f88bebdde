"""The one Ray piece of monitoring: a detached actor per deployment.

Replicas push the window-state deltas of the records they answered; the actor merges them into windows, judges each
closed window (`checks.window_report`), turns failing streaks into alerts (event log, webhook, Prometheus), and
persists everything it holds to the run folder, so a restarted actor resumes where the last save left off: the
statistics to state.json every persist_interval_s, the predictions waiting for a late label (up to max_pending) to
pending.json every pending_persist_interval_s (they outweigh the statistics many times over, so they are rewritten
less often).

The actor gets a `MonitorTarget`: its monitor section and where its deployment's run and reference are, as plain data.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from steward.govern import audit
from steward.monitor.bins import Bins
from steward.monitor.checks import AlertTracker, live_state, window_report
from steward.monitor.exporter import Exporter
from steward.monitor.process import id_key, lower_priority, post
from steward.monitor.pushes import PushLedger
from steward.monitor.reference import load_reference
from steward.monitor.window_state import WindowState
from steward.monitor.windowing import Windows
from steward.spec.monitor import MonitorSpec

NAMESPACE = "steward"
# One BLAS thread: a window's kernel matrices are a few hundred rows, too small to gain from a second thread, and on
# cores shared with the replicas an idle OpenBLAS thread spins. Set in the actor's environment because OpenBLAS reads
# it when numpy loads.
ACTOR_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
logger = logging.getLogger("steward.monitor")


def actor_name(deployment: str, run_dir: str | Path) -> str:
    """One monitor per deployment and model version: a redeployed new run starts from its own reference."""
    return f"steward-monitor-{deployment}-{Path(run_dir).name}"


def monitor_folder(run_dir: str | Path, deployment: str) -> Path:
    """Where a deployment's monitor keeps its state and event log."""
    return Path(run_dir) / "monitor" / deployment


@dataclass(frozen=True)
class MonitorTarget:
    """What a deployment's monitor actor needs, as plain data: the monitor section (validated where the application
    is built) and where the deployment's run and reference are.

    The reference travels as its folder, not as the profile: Ray keeps a detached actor's arguments for its
    restarts, and a large argument would live in the object store of the replica that started the actor.
    """

    deployment: str
    run_dir: str
    monitor: MonitorSpec
    reference: str | None = None  # the folder of the reference profile to judge against; None: training saved none
    min_replicas: int = 1  # the replicas the deployment starts with: at least this many share each window
    arm: str = "champion"  # during a rollout, which arm's model this is (the `arm` label of its metrics)


@dataclass(frozen=True)
class PushReply:
    """What a replica learns from a push: when to push next (`push_at`, `share`: records), up to which of its pushes
    the monitor has saved everything (`saved`: the replica may forget those), and, after a monitor restart that lost
    pushes it had merged but not saved, the first push to send again (`resend_from`)."""

    push_at: float
    share: float
    saved: int
    resend_from: int | None = None


def detached(name: str) -> dict[str, Any]:
    """Options of a deployment's helper actor: one of a name, found or started, outliving whoever started it, on no
    reserved CPU, restarted by Ray whenever it dies."""
    return {
        "name": name,
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "get_if_exists": True,
        "num_cpus": 0,
        "max_restarts": -1,
        "max_task_retries": 3,
    }


def monitor_actor(target: MonitorTarget) -> Any:
    """The deployment's monitor actor: found by name, or started."""
    name = actor_name(target.deployment, target.run_dir)
    options = Monitor.options(**detached(name), runtime_env={"env_vars": ACTOR_ENV})  # type: ignore[attr-defined]
    return options.remote(target)


def stop_monitors(deployment: str) -> None:
    """Save and stop the deployment's monitor actors (one per model version it served)."""
    # the deployment's actors are named by it and a run id: another deployment's name may start with this one's
    mine = re.compile(re.escape(actor_name(deployment, "")) + r"\d{8}-\d{6}-[0-9a-f]{4}")
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == NAMESPACE and mine.fullmatch(actor["name"]):
            handle = ray.get_actor(actor["name"], namespace=NAMESPACE)
            ray.get(handle.persist.remote())
            ray.kill(handle, no_restart=True)


@ray.remote
class Monitor:
    """Windows of one deployment's traffic, their judgements, open alerts; persisted every persist_interval_s."""

    def __init__(self, target: MonitorTarget) -> None:
        lower_priority()
        self.cfg, self.deployment = target.monitor, target.deployment
        self.run_dir, self.folder = Path(target.run_dir), monitor_folder(target.run_dir, target.deployment)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ref_dir = Path(target.reference) if target.reference else None
        self.ref = load_reference(self.ref_dir) if self.ref_dir else None
        bins = self.ref.bins() if self.ref else Bins()
        window = self.cfg.window
        self.windows = Windows(lambda: live_state(bins), window.size, window.step, window.by)
        self.history: deque[dict] = deque(maxlen=self.cfg.history)
        self.alerts = AlertTracker(self.cfg.alerts.consecutive_windows)
        self.records, self.pushes, self.deltas = 0, 0, 0
        self.saved_at = self.pending_saved_at = time.monotonic()
        # changed since the last save of the statistics / of the waiting predictions: an idle monitor writes nothing
        self.dirty = self.pending_dirty = False
        self.pushers: dict[str, float] = {}  # replica -> when it last pushed
        # a window is shared by at least the replicas the deployment starts with, before each has pushed: the first
        # to push is not told the whole window while the others are still filling their shares
        self.min_pushers = max(1, target.min_replicas)
        self.in_pane: dict[str, int] = {}  # replica -> records it pushed into the open pane
        self.ledger = PushLedger()  # which pushes of each replica are merged and saved
        self.exporter = Exporter(target.deployment, target.arm)
        self.id_key = id_key(self.folder)
        # request ids that have had their label, oldest first: one label per prediction
        self.labelled: dict[str, None] = {}
        self._restore()
        self._ticker: asyncio.Task | None = None

    # -- what replicas and the HTTP routes call --------------------------------------------------------------
    async def push(self, deltas: list[tuple[int, WindowState]], replica: str, kept_from: int, latest: int) -> PushReply:
        """Merge one replica's numbered deltas, in order and each once; judge every window they close.

        `kept_from` is the oldest push the replica still holds, `latest` its last. At a replica's first push to this
        actor (after a restart, or ever), the pushes it holds that this actor may lack are asked for again: those
        past the last save of the waiting predictions. A delta already merged is skipped, except for its waiting
        predictions when only the statistics had been saved.

        The reply says where the replica should cut its next delta, in records: what is left of its share of the
        open count window (the window's size over the replicas pushing, at least those the deployment starts with),
        and its share of a whole window (for after a delta of its own closes one); inf for time windows, which close
        by the clock. Deltas cut at their shares close a window within a request of its size with one delta from each
        replica, where a fixed quarter-window delta would take four; a busy replica sends several shares in one push
        (each push is a Ray call, which costs both sides CPU), and their windows are judged in one hop to a thread.
        """
        self._start_ticker()
        ledger = self.ledger
        start = ledger.resend_from(replica, kept_from, deltas[0][0] if deltas else latest + 1)
        if start is not None:
            return PushReply(*self._shares(replica), ledger.saved(replica), resend_from=start)
        closed, records = [], self.records
        for seq, state in deltas:  # merged and bookkept before any await: a push arriving meanwhile sees them merged
            if ledger.take(replica, seq):
                closed += self._merge(state, replica)
            elif ledger.pending_lost(replica, seq):
                closed += self._merge(state.take_pending(), replica)
        if self.records > records:
            self.exporter.records.inc(float(self.records - records))
        self.pushes += bool(deltas)  # not a replica's asking whether what it sent is saved yet
        self.deltas += len(deltas)
        await self._judge(closed)
        return PushReply(*self._shares(replica), ledger.saved(replica))

    def _merge(self, state: WindowState, replica: str) -> list[WindowState]:
        """Merge one delta into the open pane; returns the windows it closed."""
        self.records += state.n
        self.dirty = self.pending_dirty = True
        pane = self.windows.pane
        closed = self.windows.add_state(state)
        if self.windows.pane is pane:
            self.in_pane[replica] = self.in_pane.get(replica, 0) + state.n
        else:  # the delta closed the pane: the next starts empty
            self.in_pane = {}
        return closed

    async def request_id_key(self) -> bytes:
        """The key replicas sign request ids with, the same across restarts and redeployments of this run."""
        return self.id_key

    async def feedback(self, request_id: str, label: str) -> str:
        """A late label for an earlier prediction: "matched" (counted now), "waiting" (for its prediction, which a
        replica still holds) or "duplicate" (the prediction already had its label; nothing is counted)."""
        if request_id in self.labelled:
            return "duplicate"
        self._start_ticker()
        self.dirty = self.pending_dirty = True
        self.labelled[request_id] = None
        if len(self.labelled) > (limit := self.windows.pane.max_pending):
            for old in list(itertools.islice(self.labelled, len(self.labelled) - limit)):
                del self.labelled[old]
        return "matched" if self.windows.add_feedback(request_id, label) else "waiting"

    async def report(self, recent: int = 10) -> dict:
        """The monitor's view: the open window judged so far, recent closed windows, open alerts, thresholds."""
        current = window_report(self.windows.current(), self.ref, self.cfg)
        return {
            "deployment": self.deployment,
            "records": self.records,
            "pushes": self.pushes,  # since this actor started
            "deltas": self.deltas,  # in those pushes (a busy replica sends several window shares a push)
            "replicas": len(self._recent_pushers()),
            "windows_closed": len(self.history),
            "current": current,
            "recent": list(self.history)[-recent:],
            "alerts": list(self.alerts.open.values()),
            "config": self.cfg.model_dump(mode="json"),
        }

    async def closed_since(self, since: float) -> list[dict]:
        """The closed windows' reports whose records end at or after `since` (a rollout's step), judging nothing
        new: what a rollout reads every interval, without the open window's drift tests that `report` runs."""
        return [w for w in self.history if (w["end"] or 0) >= since]

    async def persist(self, pending: bool = True) -> Path:
        """Save the statistics (never payloads) atomically, and with `pending` the predictions waiting for a label;
        runs every persist_interval_s (statistics) and pending_persist_interval_s (waiting predictions)."""
        applied = dict(self.ledger.applied)
        texts = self._snapshot(pending)  # on the event loop: no push changes the windows while they are copied
        await asyncio.to_thread(self._write, texts)
        self.ledger.mark_saved(applied, pending)
        return self.folder / "state.json"

    def __ray_shutdown__(self) -> None:
        self._write(self._snapshot(pending=True))  # a graceful stop (`steward serve stop`) loses nothing

    # -- inside ------------------------------------------------------------------------------------------------
    def _snapshot(self, pending: bool) -> dict[str, str]:
        """The texts of state.json and, with `pending`, pending.json."""
        self.saved_at, self.dirty = time.monotonic(), False
        state = {
            "records": self.records,
            "reference": str(self.ref_dir.relative_to(self.run_dir)) if self.ref_dir else None,
            "windows": self.windows.to_dict(pending=False),
            "history": list(self.history),
            "alerts": self.alerts.to_dict(),
            **self.ledger.to_dict(),
            "saved": time.time(),
        }
        texts = {"state.json": json.dumps(state)}
        if pending:
            self.pending_saved_at, self.pending_dirty = self.saved_at, False
            waiting = {
                **self.windows.pane.pending_to_dict(),
                "labelled": list(self.labelled),
                "applied": self.ledger.applied,
            }
            texts["pending.json"] = json.dumps(waiting)
        return texts

    def _write(self, texts: dict[str, str]) -> None:
        for name, text in texts.items():
            path = self.folder / name
            partial = path.with_suffix(".partial")
            partial.write_text(text)
            partial.replace(path)

    def _restore(self) -> None:
        path, pending = self.folder / "state.json", self.folder / "pending.json"
        if not path.exists():
            return
        doc = json.loads(path.read_text())
        self.records = doc["records"]
        self.windows.restore(doc["windows"])
        self.history.extend(doc["history"])
        self.alerts.restore(doc["alerts"])
        waiting = json.loads(pending.read_text()) if pending.exists() else None
        if waiting is not None:  # else state.json holds them, as saves made before pending.json existed do
            self.windows.pane.restore_pending(waiting)
            self.labelled = dict.fromkeys(waiting.get("labelled", []))
        self.ledger.restore(doc, waiting)
        # Ray's metrics live in this process: the gauges of the last window and of the open alerts come back with it
        if self.history:
            self.exporter.window(self.history[-1], [])
        for name in self.alerts.open:
            self.exporter.failing.set(1.0, {"check": name})
        logger.info("monitor %s resumed from %s (%d records)", self.deployment, path, self.records)

    def _shares(self, replica: str) -> tuple[float, float]:
        if self.cfg.window.by != "count":
            return math.inf, math.inf
        self.pushers = self._recent_pushers()
        self.pushers[replica] = time.monotonic()
        share = self.windows.step / max(len(self.pushers), self.min_pushers)
        left = share - self.in_pane.get(replica, 0)
        # once its share of the open window is spent, its share of the next (a push per share, never one a
        # request); never more than the open window still needs
        return max(1.0, min(left if left > 0 else share, self.windows.step - self.windows.pane.n)), share

    def _recent_pushers(self) -> dict[str, float]:
        # a replica with traffic pushes at least every push_interval_s: one not heard from for three is gone
        now = time.monotonic()
        return {r: t for r, t in self.pushers.items() if now - t < 3 * self.cfg.push_interval_s}

    def _start_ticker(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """Close time windows when traffic stops; save the statistics every persist_interval_s and the waiting
        predictions every pending_persist_interval_s, each only when it changed."""
        cfg = self.cfg
        while True:
            await asyncio.sleep(min(cfg.push_interval_s, cfg.persist_interval_s, cfg.pending_persist_interval_s))
            if cfg.window.by == "time":
                await self._judge(self.windows.add_state(live_state(self.windows.pane.bins)))
            now = time.monotonic()
            pending = self.pending_dirty and now - self.pending_saved_at >= cfg.pending_persist_interval_s
            if pending or (self.dirty and now - self.saved_at >= cfg.persist_interval_s):
                await self.persist(pending)

    async def _judge(self, closed: list[WindowState]) -> None:
        if not closed:
            return
        # the MMD permutations are the slow part of judging: off the event loop, so pushes keep flowing meanwhile;
        # a push's windows in one hop to the thread (each hop wakes two threads)
        first = len(self.history)
        reports = await asyncio.to_thread(
            lambda: [window_report(window, self.ref, self.cfg, first + i) for i, window in enumerate(closed)]
        )
        for report in reports:
            self.history.append(report)
            events = self.alerts.update(report)
            self.dirty = True
            self.exporter.window(report, events)
            for event in events:
                await self._emit(event)
            if events:  # an alert opened or cleared is saved at once: a restart must not forget it
                await self.persist(pending=False)

    async def _emit(self, event: dict) -> None:
        event = {**event, "deployment": self.deployment}
        logger.warning("monitor %s: %s %s = %s", self.deployment, event["event"], event["name"], event["value"])
        with (self.folder / "events.jsonl").open("a") as log:
            log.write(json.dumps(event) + "\n")
        kind = "raised" if event["event"] == "alert" else "cleared"
        fields = {k: v for k, v in event.items() if k not in ("event", "time")}
        audit.record(
            f"monitor.alert.{kind}", log=audit.log_path(self.run_dir.parent.parent), run=self.run_dir.name, **fields
        )
        if self.cfg.alerts.webhook:
            await asyncio.to_thread(post, self.cfg.alerts.webhook, event)
