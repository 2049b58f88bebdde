"""A replica's side of monitoring: count each answered record into a window state, push it to the monitor actor.

Counting runs after the response is handed back (scheduled on the event loop, never awaited by the request), and
pushes go out every monitor.push_interval_s, so the request path pays neither.
"""

import asyncio
import logging
from pathlib import Path
from typing import Any

from steward.evaluate.profile import unknown_token_id
from steward.monitor.actor import monitor_actor, reference_for
from steward.monitor.reference import PREDICTED_CLASS
from steward.monitor.signals import record_signals
from steward.monitor.window import Bins, WindowState
from steward.serve.model import Output, ServedModel
from steward.spec import JobSpec

logger = logging.getLogger("steward.serve")


class MonitorUnavailable(ValueError):
    """The spec asks for monitoring this run cannot provide."""


class ReplicaMonitor:
    """Window state of the records this replica answered since its last push."""

    def __init__(self, job: JobSpec, served: ServedModel, deployment: str) -> None:
        assert job.monitor is not None
        self.cfg, self.served = job.monitor, served
        if problem := reference_problem(job, served.run_dir):
            raise MonitorUnavailable(problem)
        self.ref = reference_for(served.run_dir)
        self.bins = self.ref.bins() if self.ref else Bins()
        self.state = WindowState(self.bins)
        self.unk = unknown_token_id(served.info)
        self.group = self.cfg.bias.group if self.cfg.bias else None
        self.actor = monitor_actor(job.model_dump(mode="json"), str(served.run_dir), deployment)
        self.pusher: asyncio.Task | None = None
        # Count windows close at the first delta that fills them: pushing every quarter window keeps them near size.
        window = self.cfg.window
        self.push_at = (window.step or window.size) / 4 if window.by == "count" else float("inf")

    def record(self, output: Output, attributes: dict[str, list[Any]], request_ids: list[str]) -> None:
        """Count one request's records (statistics only: the payload is not kept)."""
        info = self.served.info
        assert output.inputs is not None, "the replica runs the model with embed=True when monitored"
        signals = record_signals(
            info.modality, output.inputs, output.probabilities, info.label_names, output.embeddings,
            output.attention_mask, self.unk,
        )  # fmt: skip
        rows = signals.rows(self.bins.names)
        groups = attributes.get(self.group or "", [None] * len(request_ids))
        for i, request_id in enumerate(request_ids):
            samples = {}
            if signals.embeddings is not None:
                samples["embedding"] = signals.embeddings[i]
            if signals.features is not None:
                samples["features"] = signals.features[i]
            self.state.add(
                signals.predicted[i], None if groups[i] is None else str(groups[i]), rows[i],
                {PREDICTED_CLASS: signals.predicted[i]}, samples, request_id,
            )  # fmt: skip
        loop = asyncio.get_running_loop()
        if self.pusher is None:
            self.pusher = loop.create_task(self._push_forever())
        if self.state.n >= self.push_at:
            loop.create_task(self.flush())

    async def feedback(self, request_id: str, label: str) -> bool:
        """A late label: counted here if this replica still holds the prediction, else matched by the monitor."""
        if self.state.add_feedback(request_id, label):
            return True
        return await self.actor.feedback.remote(request_id, label)

    async def report(self) -> dict:
        await self.flush()
        return await self.actor.report.remote()

    async def flush(self) -> None:
        """Send what was counted since the last push (a replica that dies loses at most one interval)."""
        if not (self.state.n or self.state.pending_labels):
            return
        delta, self.state = self.state, WindowState(self.bins)
        await self.actor.push.remote(delta)  # pickled with its numpy arrays as they are: no list conversion

    async def _push_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.push_interval_s)
            try:
                await self.flush()
            except Exception:  # the monitor restarting must not break serving; the next push retries
                logger.exception("monitor push failed")


def reference_problem(job: JobSpec, run_dir: Path) -> str | None:
    """Why this run cannot be deployed with the spec's monitoring, checked before deploying."""
    if job.monitor is not None and job.monitor.drift is not None and reference_for(run_dir) is None:
        return (f"monitor.drift needs the reference profile training saves beside the model, and {run_dir}/model "
                "has no reference.json: retrain the run with this steward, or remove monitor.drift")  # fmt: skip
    return None
