"""A deployment's rollout: a detached actor that moves a challenger beside the live champion step by step.

Every rollout.interval_s it reads both arms' monitors (each its own actor, judging its arm against its own reference),
judges the challenger's windows closed since the last look with `monitor.compare.judge_step`, and goes on, holds,
promotes or rolls back. Replicas ask it for the routing at the same interval and send their per-arm request counts,
so a rollback reaches every replica within one interval. Its state is saved to `<output_dir>/rollouts/<deployment>/`
at every decision: a restarted actor resumes the step it was in (the step's request counts since the last save are
lost, and counted again from traffic).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.util.metrics import Counter, Gauge

from steward.errors import StewardError
from steward.govern import audit
from steward.govern.policy import PolicyViolation, admit
from steward.monitor.actor import NAMESPACE, actor_name, detached
from steward.monitor.compare import ARMS, ArmStats, Judgement, judge_step
from steward.monitor.process import post
from steward.runs import read_spec
from steward.spec.rollout import RolloutSpec

if TYPE_CHECKING:  # the actor's process needs no torch
    from steward.serve.model import ModelSource

logger = logging.getLogger("steward.serve")
STATES = ("running", "promoted", "rolled_back", "aborted")
KEPT = 200  # decisions kept in state.json


def rollout_name(deployment: str) -> str:
    return f"steward-rollout-{deployment}"


def rollout_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class RolloutTarget:
    """What a rollout actor needs, as plain data: the deployment, both arms' run folders, the section, where the
    audit log and its state go, the webhook alerts go to and the policy file promotion is checked against."""

    deployment: str
    champion: str
    challenger: str
    rollout: RolloutSpec
    output_dir: str
    id: str
    policy: str | None = None
    webhook: str | None = None

    @property
    def folder(self) -> Path:
        """Where the rollout keeps its state and events: one folder per rollout of the deployment."""
        return Path(self.output_dir) / "rollouts" / self.deployment / self.id


@dataclass(frozen=True)
class Challenger:
    """What replicas serve beside the champion during a rollout: the challenger's model and the rollout."""

    model: ModelSource
    target: RolloutTarget


@dataclass(frozen=True)
class Routing:
    """What replicas do: `state` and the challenger's `share` (canary: of answers; shadow: of requests mirrored)."""

    mode: str
    state: str
    share: float

    def answers(self, draw: float) -> str:
        """The arm that answers a request whose routing draw (in [0, 1)) is `draw`."""
        if self.state == "promoted" or (self.mode == "canary" and self.state == "running" and draw < self.share):
            return "challenger"
        return "champion"

    def mirrors(self, draw: float) -> bool:
        return self.mode == "shadow" and self.state == "running" and draw < self.share


def rollout_actor(target: RolloutTarget) -> Any:
    """The deployment's rollout actor: found by name, or started."""
    return Rollout.options(**detached(rollout_name(target.deployment))).remote(target)  # type: ignore[attr-defined]


def find_rollout(deployment: str) -> Any:
    """The rollout actor of `deployment`, or None."""
    try:
        return ray.get_actor(rollout_name(deployment), namespace=NAMESPACE)
    except ValueError:
        return None


def replace_rollout(target: RolloutTarget) -> Any:
    """Start `target`'s rollout in place of the deployment's last one, which must have ended (StewardError if not)."""
    old = find_rollout(target.deployment)
    if old is not None:
        status = ray.get(old.status.remote())
        if status["state"] == "running":
            raise StewardError(
                f"a rollout of {target.deployment} is running (challenger {status['challenger']}): "
                f"`steward rollout promote` or `steward rollout abort` it first"
            )
        ray.kill(old, no_restart=True)
    actor = rollout_actor(target)
    ray.get(actor.status.remote())  # started, and its `started` decision recorded, before any replica asks
    return actor


def stop_rollout(deployment: str) -> None:
    """Stop the deployment's rollout actor (its state is saved at every decision)."""
    if (actor := find_rollout(deployment)) is not None:
        ray.kill(actor, no_restart=True)


@dataclass
class State:
    state: str = "running"
    step: int = 0
    step_started: float = field(default_factory=time.time)
    judged_until: float = 0.0  # the end of the last challenger window judged
    decisions: list[dict] = field(default_factory=list)


def load_state(path: Path) -> tuple[State, str | None]:
    """The state a rollout saved (a new one if none), and why it could not be read, if so."""
    if not path.exists():
        return State(), None
    try:
        state = State(**json.loads(path.read_text())["state"])
    except (ValueError, TypeError, KeyError) as err:
        return State(), f"{path} could not be read ({type(err).__name__}: {err}); start the rollout again"
    if state.state not in STATES or not isinstance(state.step, int) or state.step < 0:
        return State(), f"{path} holds no rollout state steward wrote (state {state.state!r}, step {state.step!r})"
    return state, None


@ray.remote
class Rollout:
    def __init__(self, target: RolloutTarget) -> None:
        self.target, self.cfg = target, target.rollout
        self.folder = target.folder
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "state.json"
        self.s, problem = load_state(path)
        self.stats = {arm: ArmStats() for arm in ARMS}
        self.last: Judgement | None = None
        self.metrics = _Metrics(target.deployment)
        self._ticker: asyncio.Task | None = None
        if problem is not None:  # the step is unknown: nothing goes on until a person starts again
            self._decide("aborted", {"reason": problem, "by": "steward"}, state="aborted")
        elif not self.s.decisions:
            self._decide("started", {"mode": self.cfg.mode, "steps": self.cfg.steps})
        self._export()

    # -- what replicas and the CLI call --------------------------------------------------------------------
    async def sync(self, stats: dict[str, dict]) -> Routing:
        """A replica's per-arm counts since its last sync; the routing it follows until the next."""
        self._start_ticker()
        for arm, counts in stats.items():
            self.stats[arm].add(ArmStats(**counts))
        return self.routing()

    def routing(self) -> Routing:
        steps = self.cfg.steps
        share = {"running": steps[min(self.s.step, len(steps) - 1)], "promoted": 1.0}.get(self.s.state, 0.0)
        return Routing(self.cfg.mode, self.s.state, share)

    async def status(self) -> dict:
        self._start_ticker()
        return {
            "deployment": self.target.deployment,
            "mode": self.cfg.mode,
            "state": self.s.state,
            "step": self.s.step,
            "steps": self.cfg.steps,
            "share": self.routing().share,
            "champion": self.target.champion,
            "challenger": self.target.challenger,
            "arms": {arm: stats.summary() for arm, stats in self.stats.items()},
            "last_judgement": None if self.last is None else _judgement(self.last),
            "decisions": self.s.decisions[-50:],
        }

    async def promote(self, reason: str, by: str = "user") -> dict:
        """Promote now (the challenger answers every request), when the policy in force admits its run."""
        if self.s.state == "running":
            self._promote({"reason": reason, "by": by})
        return await self.status()

    async def abort(self, reason: str, by: str = "user") -> dict:
        """Send every request back to the champion."""
        if self.s.state in ("running", "promoted"):
            self._decide("aborted", {"reason": reason, "by": by}, state="aborted")
        return await self.status()

    # -- inside --------------------------------------------------------------------------------------------
    def _start_ticker(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval_s)
            try:
                if self.s.state == "running":
                    await self._judge()
                self._export()
            except Exception:  # an arm's monitor restarting must not stop the rollout; the next tick retries
                logger.exception("rollout %s: judging failed", self.target.deployment)

    async def _judge(self) -> None:
        windows: dict[str, list[dict]] = {}
        for arm, run in (("champion", self.target.champion), ("challenger", self.target.challenger)):
            try:
                monitor = ray.get_actor(actor_name(self.target.deployment, run), namespace=NAMESPACE)
            except ValueError:
                return  # its replicas have not started it yet
            windows[arm] = await monitor.closed_since.remote(self.s.step_started)
        new = [w for w in windows["challenger"] if w["end"] > self.s.judged_until]
        if not new:
            return
        self.s.judged_until = max(w["end"] for w in new)
        self.last = judgement = judge_step(windows, new, self.stats, self.cfg.gates, self.cfg.min_records)
        if judgement.decision == "rollback":
            self._decide("rolled_back", _judgement(judgement), state="rolled_back")
            if self.target.webhook:
                await asyncio.to_thread(post, self.target.webhook, {"event": "rollout.rolled_back", **self._fields()})
        elif judgement.decision == "advance":
            if self.s.step + 1 < len(self.cfg.steps):
                self._next_step(judgement)
            elif self.cfg.auto_promote:
                self._promote({"by": "gates", **_judgement(judgement)})
            elif self.s.decisions[-1]["decision"] != "ready":  # said once: promotion is the user's
                self._decide("ready", _judgement(judgement))
        self._save()

    def _next_step(self, judgement: Judgement) -> None:
        self.s.step += 1
        self.s.step_started = time.time()
        self.stats = {arm: ArmStats() for arm in ARMS}
        self._decide("step", {"share": self.cfg.steps[self.s.step], **_judgement(judgement)})

    def _promote(self, fields: dict) -> None:
        challenger = Path(self.target.challenger)
        try:
            admit(read_spec(challenger), self.target.policy, "promote", str(challenger))
        except PolicyViolation as err:
            self._decide("promotion_refused", {**fields, "refused": str(err)})
            return
        self._decide("promoted", fields, state="promoted")

    def _decide(self, decision: str, fields: dict, state: str | None = None) -> None:
        """Record a decision: the rollout's events, the audit chain, Prometheus; saved at once."""
        if state is not None:
            self.s.state = state
        entry = {"decision": decision, "time": time.time(), "step": self.s.step, **fields}
        self.s.decisions = [*self.s.decisions[-(KEPT - 1) :], entry]  # events.jsonl keeps them all
        self._save()  # first: the state is what a restarted actor resumes from
        with (self.folder / "events.jsonl").open("a") as log:
            log.write(json.dumps(entry) + "\n")
        audit.record(f"rollout.{decision}", log=audit.log_path(self.target.output_dir), **(self._fields() | fields))
        logger.warning("rollout %s: %s", self.target.deployment, decision)
        self.metrics.decisions.inc(1.0, {"decision": decision})
        self._export()

    def _fields(self) -> dict[str, Any]:
        return {
            "deployment": self.target.deployment,
            "champion": self.target.champion,
            "challenger": self.target.challenger,
            "state": self.s.state,
            "share": self.routing().share,
        }

    def _save(self) -> None:
        partial = self.folder / "state.partial"
        target: dict[str, Any] = {"deployment": self.target.deployment, "champion": self.target.champion}
        target |= {"challenger": self.target.challenger, "rollout": self.target.rollout.model_dump(mode="json")}
        arms = {arm: stats.summary() for arm, stats in self.stats.items()}  # the step's, as status shows them
        partial.write_text(
            json.dumps({"state": self.s.__dict__, "share": self.routing().share, "arms": arms, "target": target})
        )
        partial.replace(self.folder / "state.json")

    def _export(self) -> None:
        self.metrics.export(self.s.state, self.routing().share, self.stats, self.last)


def _judgement(judgement: Judgement) -> dict[str, Any]:
    return {
        "records": judgement.records,
        "failed": [g.to_dict() for g in judgement.failed],
        "gates": [g.to_dict() for g in judgement.gates],
    }


class _Metrics:
    """The rollout's Prometheus metrics (label `arm` for what each arm shows)."""

    def __init__(self, deployment: str) -> None:
        self.share = Gauge("steward_rollout_share", "The challenger's share of requests.", ("deployment",))
        self.state = Gauge("steward_rollout_state", "1 for the rollout's state.", ("deployment", "state"))
        self.gate = Gauge("steward_rollout_gate", "A gate's last value.", ("deployment", "gate"))
        self.failing = Gauge("steward_rollout_gate_failing", "1 while a gate fails.", ("deployment", "gate"))
        self.requests = Gauge("steward_rollout_requests", "Requests in the step.", ("deployment", "arm"))
        self.errors = Gauge("steward_rollout_error_rate", "Failed share in the step.", ("deployment", "arm"))
        self.latency = Gauge("steward_rollout_latency_p50_ms", "p50 latency in the step.", ("deployment", "arm"))
        self.decisions = Counter("steward_rollout_decisions", "Rollout decisions.", ("deployment", "decision"))
        for metric in (self.share, self.state, self.gate, self.failing, self.requests, self.errors, self.latency):
            metric.set_default_tags({"deployment": deployment})
        self.decisions.set_default_tags({"deployment": deployment})

    def export(self, state: str, share: float, stats: dict[str, ArmStats], last: Judgement | None) -> None:
        self.share.set(share)
        for name in STATES:
            self.state.set(1.0 if name == state else 0.0, {"state": name})
        for arm, arm_stats in stats.items():
            self.requests.set(float(arm_stats.requests), {"arm": arm})
            if arm_stats.error_rate is not None:
                self.errors.set(arm_stats.error_rate, {"arm": arm})
            if arm_stats.p50_ms is not None:
                self.latency.set(arm_stats.p50_ms, {"arm": arm})
        for gate in last.gates if last else []:
            if gate.value is not None:
                self.gate.set(float(gate.value), {"gate": gate.gate})
            self.failing.set(1.0 if gate.status == "fail" else 0.0, {"gate": gate.gate})
