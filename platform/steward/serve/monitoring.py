"""A replica's side of monitoring: count each answered record into a window state, push it to the monitor actor.

A request only queues its outputs (an append; the request awaits nothing). The queue is cut where it holds what is
left of this replica's share of the open count window; each cut is counted, in one vectorised pass, into a delta of
its own, so windows close where they would with a push a share. The cuts are sent together, SHARES_A_PUSH of them in
one Ray call, or whatever is held once monitor.push_interval_s has passed since the last push; the request path pays
neither the counting nor the call.
"""

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util import metrics

from steward.errors import StewardError
from steward.evaluate.profile import unknown_token_id
from steward.monitor.actor import MonitorTarget, monitor_actor
from steward.monitor.bins import Bins
from steward.monitor.checks import live_state
from steward.monitor.ngrams import NGRAMS_FILE, load_ngrams
from steward.monitor.reference import PREDICTED_CLASS, load_reference, reference_dir
from steward.monitor.signals import record_signals
from steward.monitor.window_state import WindowState
from steward.serve.labels import RateLimit, RequestIds
from steward.serve.model import Output, ServedModel
from steward.serve.protocol import BadRequest
from steward.spec.monitor import BiasSpec, MonitorSpec
from steward.spec.serve import ServeSpec

logger = logging.getLogger("steward.serve")
OTHER_GROUP = "(other)"  # the group of values first seen after monitor.bias.max_groups others
# Window shares a busy replica holds before one push sends them (each its own delta): the monitor's cost of a push
# (Ray's call, the hop to its event loop, unpickling) is paid once for four windows. Never longer than
# monitor.push_interval_s.
SHARES_A_PUSH = 4


class MonitorUnavailable(StewardError):
    """The spec asks for monitoring this run cannot provide."""


def monitor_target(
    cfg: MonitorSpec, serve: ServeSpec, deployment: str, run_dir: Path, int8: bool, arm: str = "champion"
) -> MonitorTarget:
    """What the deployment's monitor actor is told: `cfg`, and the run and reference of the model served (`int8`:
    the run's int8 model) in `arm`."""
    ref_dir = reference_dir(run_dir, int8=int8)
    reference = str(ref_dir) if ref_dir else None
    return MonitorTarget(deployment, str(run_dir), cfg, reference, serve.replica_range[0], arm)


class ReplicaMonitor:
    """Window state of the records this replica answered since its last push; `queue_for(bins)` makes the queue
    that holds them until a push counts them on the reference's bins."""

    def __init__(self, target: MonitorTarget, queue_for: Callable[[Bins], "Queue"]) -> None:
        self.cfg = target.monitor
        if problem := reference_problem(self.cfg, Path(target.run_dir)):
            raise MonitorUnavailable(problem)
        self.ref = load_reference(target.reference) if target.reference else None
        self.bins = self.ref.bins() if self.ref else Bins()
        self.queue = queue_for(self.bins)
        self.actor = monitor_actor(target)
        self.ids = RequestIds(ray.get(self.actor.request_id_key.remote()))
        self.labels_allowed = RateLimit(self.cfg.feedback_rate)
        self.refused_labels: Counter[str] = Counter()
        self.refused_metric = metrics.Counter(
            "steward_feedback_refused", "Late labels refused, by reason.", ("deployment", "reason")
        )
        self.refused_metric.set_default_tags({"deployment": target.deployment})
        self.pusher: asyncio.Task | None = None
        self.id = uuid.uuid4().hex
        # Count windows close at the first delta that fills them. Each push's reply says how many records this
        # replica should cut a delta at next (what is left of its share of the open window) and its share of a whole
        # window; until the first reply, a quarter window keeps windows near their size.
        window = self.cfg.window
        quarter = (window.step or window.size) / 4 if window.by == "count" else float("inf")
        self.push_at, self.window_share, self.pushes = quarter, quarter, 0
        self.told = False  # whether a reply has said this replica's share yet
        self.pushed_at = time.monotonic()  # when everything counted so far was last sent
        self.held: list[Cut] = []  # shares cut from the queue, waiting for the push that sends them
        # deltas are numbered; those the monitor has not saved yet are kept, and sent again if it restarts without them
        self.seq = 0
        self.unsaved: list[tuple[int, WindowState]] = []

    def record(self, *item: Any) -> None:
        """Queue one request's records (the queue's `append` arguments) until the next push counts them; from then
        on only statistics are kept."""
        self.queue.append(*item)
        self._start_pushing()
        if self.queue.queued >= self.push_at:
            self.held.append(self.queue.cut())
            self.push_at = self.window_share  # until a reply says otherwise: its share of the next window
            # before the monitor's first reply the share is a guess: a cut goes at once, so the reply corrects it
            if len(self.held) == SHARES_A_PUSH or not self.told:
                asyncio.get_running_loop().create_task(self.flush())

    def refused(self, records: int) -> None:
        """Count records refused as invalid into the window (they are kept out of every other statistic)."""
        self.queue.invalid += records
        self._start_pushing()

    def _start_pushing(self) -> None:
        if self.pusher is None:
            self.pusher = asyncio.get_running_loop().create_task(self._push_forever())

    def admit_label(self) -> None:
        """Refuse a label over monitor.feedback_rate (429 with Retry-After) before reading its body."""
        if wait := self.labels_allowed.wait():
            message = f"over this replica's {self.cfg.feedback_rate:g} labels a second (monitor.feedback_rate)"
            raise self.refuse("rate", BadRequest(429, "feedback", message, {"Retry-After": str(wait)}))

    def refuse(self, reason: str, err: BadRequest) -> BadRequest:
        """`err`, counted as a label refused for `reason` (Prometheus and /info)."""
        self.refused_labels[reason] += 1
        self.refused_metric.inc(1.0, {"reason": reason})
        return err

    async def feedback(self, request_id: str, label: str) -> str:
        """A late label for a prediction this deployment made, sent to the monitor, which keeps one per prediction:
        "matched", or "waiting" while a replica still holds its prediction."""
        if not self.ids.issued(request_id):
            raise self.refuse("unknown", BadRequest(404, "request_id", "no prediction of this deployment has this id"))
        try:
            outcome = await self.actor.feedback.remote(request_id, label)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            raise BadRequest(
                503, "monitor", "the monitor is restarting; send the label again", {"Retry-After": "1"}
            ) from None
        if outcome == "duplicate":
            raise self.refuse("duplicate", BadRequest(409, "request_id", "this prediction already has its label"))
        return outcome

    async def report(self) -> dict:
        await self.flush()
        return await self.actor.report.remote()

    async def flush(self) -> None:
        """Send what was counted since the last push, a delta per share cut, and again what a restarted monitor lost
        (a replica that dies loses at most one interval; a monitor that dies, nothing)."""
        self.pushed_at = time.monotonic()
        rest, cuts, self.held = self.queue.cut(), self.held, []
        # What is left of this replica's share until the reply says: a reply waits for the windows its push closed
        # to be judged, and one to an earlier push misses the later ones.
        self.push_at = self.push_at - rest.records if rest.records < self.push_at else self.window_share
        sent = []
        for cut in [*cuts, rest]:
            delta = live_state(self.bins)
            self.queue.count_into(delta, cut)
            if delta.n or delta.invalid:
                self.seq += 1
                sent.append((self.seq, delta))
        self.unsaved += sent
        if not sent and not self.unsaved:
            return  # else nothing new: ask whether the monitor has saved what it was sent
        self.pushes += 1
        push = self.pushes
        kept_from = self.unsaved[0][0] if self.unsaved else self.seq + 1
        # pickled with its numpy arrays as they are
        reply = await self.actor.push.remote(sent, self.id, kept_from, self.seq)
        if reply.resend_from is not None:
            lost = [entry for entry in self.unsaved if entry[0] >= reply.resend_from]
            reply = await self.actor.push.remote(lost, self.id, kept_from, self.seq)
        self.unsaved = [entry for entry in self.unsaved if entry[0] > reply.saved]
        if push == self.pushes and not self.held:  # else a later push, or a share cut since, makes it stale
            self.push_at, self.window_share, self.told = reply.push_at, reply.share, True

    async def last_push(self) -> None:
        """Send what is left at a replica's graceful stop (scale-down, redeploy, delete), within 10 s."""
        try:
            await asyncio.wait_for(self.flush(), timeout=10)
        except Exception:  # a monitor that is gone must not hold up the stop
            logger.exception("last monitor push failed")

    async def _push_forever(self) -> None:
        """Push once push_interval_s has passed since the last push: a replica that dies loses at most an interval,
        and one busy enough to push its shares makes no extra pushes (each is a Ray call)."""
        while True:
            last = self.pushed_at
            await asyncio.sleep(last + self.cfg.push_interval_s - time.monotonic())
            if self.pushed_at != last:
                continue  # a share push came in between: wait an interval from it
            try:
                await self.flush()
            except Exception:  # the monitor restarting must not break serving; the next push retries
                logger.exception("monitor push failed")


Item = tuple[Output, list[Any] | None, list[str], float]  # a request's outputs, groups, request ids, answer time


@dataclass(frozen=True)
class Cut:
    """Requests taken from the queue together, to be counted into one delta, and the records refused meanwhile."""

    items: list[Any]  # the queue's items (a `RecordQueue`'s are `Item`s)
    records: int
    invalid: int


class Queue:
    """What a replica keeps answered records in until a push counts them into a window state, in one vectorised
    pass over a share's worth of records: far cheaper than counting each request in Python as it is answered."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.queued = 0  # records queued
        self.invalid = 0  # records refused as invalid since the last cut

    def append(self, *item: Any) -> None:
        raise NotImplementedError

    def cut(self) -> Cut:
        """Take everything queued (and refused) so far; the queue starts empty."""
        cut = Cut(self.items, self.queued, self.invalid)
        self.items, self.queued, self.invalid = [], 0, 0
        return cut

    def count_into(self, state: WindowState, cut: Cut | None = None) -> None:
        """Count the records of `cut` (default: everything queued, which empties the queue) into `state`."""
        raise NotImplementedError


class RecordQueue(Queue):
    """A classifier's answered requests: their outputs, groups and request ids."""

    def __init__(self, served: ServedModel, bins: Bins, bias: BiasSpec | None) -> None:
        super().__init__()
        self.served, self.bins = served, bins
        self.group: str | None = bias.group if bias else None
        self.max_groups = bias.max_groups if bias else 0
        self.groups_kept: set[str] = {bias.privileged} if bias and bias.privileged else set()
        self.unk = unknown_token_id(served.info)

    def append(self, output: Output, attributes: dict[str, list[Any]], request_ids: list[str]) -> None:
        assert output.inputs is not None, "the replica runs the model with embed=True when monitored"
        groups = attributes.get(self.group) if self.group else None  # without a bias section nothing is grouped
        self.items.append((output, groups, request_ids, time.time()))
        self.queued += len(request_ids)

    def count_into(self, state: WindowState, cut: Cut | None = None) -> None:
        cut = self.cut() if cut is None else cut
        state.invalid += cut.invalid
        queue = cut.items
        if not queue:
            return
        info = self.served.info

        outputs = [item[0] for item in queue]

        def joined(name: str) -> Any:
            parts = [getattr(output, name) for output in outputs]
            return None if parts[0] is None else np.concatenate(parts)

        # only sequence and text inputs are summarised into signals; an image's pixels would be joined for nothing
        inputs: Any = joined("inputs") if info.modality in ("sequence", "text") else None
        signals = record_signals(
            info.modality,
            inputs,
            joined("probabilities"),
            info.label_names,
            joined("embeddings"),
            joined("attention_mask"),
            self.unk,
        )
        groups = [self._kept(g) for _, gs, ids, _ in queue for g in (gs or [None] * len(ids))]
        samples = {"embedding": signals.embeddings} if signals.embeddings is not None else {}
        if signals.features is not None:
            samples["features"] = signals.features
        state.add_batch(
            signals.predicted,
            groups,
            signals.rows(self.bins.names),
            samples,
            t=(queue[0][3], queue[-1][3]),
            categories={PREDICTED_CLASS: signals.predicted},
            request_ids=[r for _, _, ids, _ in queue for r in ids],
        )

    def _kept(self, group: Any) -> str | None:
        """The group key a value is counted under: itself while fewer than max_groups values are kept, else OTHER."""
        if group is None:
            return None
        key = str(group)
        if key not in self.groups_kept:
            if len(self.groups_kept) >= self.max_groups:
                return OTHER_GROUP
            self.groups_kept.add(key)
        return key


def reference_problem(cfg: MonitorSpec | None, run_dir: Path) -> str | None:
    """Why this run cannot be deployed with the monitor section `cfg`, checked before deploying."""
    if cfg is not None and cfg.drift is not None and reference_dir(run_dir) is None:
        return (
            f"monitor.drift needs the reference profile training saves beside the model, and {run_dir}/model "
            "has no reference.json: retrain the run with this steward, or remove monitor.drift"
        )
    if cfg is not None and cfg.leaks is not None:
        ngrams = load_ngrams(Path(run_dir) / "model")
        if ngrams is None:
            return (
                f"monitor.leaks needs the training n-grams saved beside the model, and {run_dir}/model has no "
                f"{NGRAMS_FILE}: retrain the run with this steward (a streamed train split saves none), or remove "
                "monitor.leaks"
            )
        if ngrams.n != cfg.leaks.ngram:
            return f"monitor.leaks.ngram is {cfg.leaks.ngram}, and the run saved {ngrams.n}-grams: set it to {ngrams.n}"
    return None
