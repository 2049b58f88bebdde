"""A replica's arms: the champion's model and, during a rollout, the challenger's beside it, each with its own monitor
(judged against its own reference). Which arm answers a request, and whether it is mirrored, is the rollout actor's
routing, asked for every rollout.interval_s together with sending each arm's request counts."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from steward.monitor.compare import ArmStats
from steward.serve.model import Output, ServedModel, non_finite_row
from steward.serve.monitoring import ReplicaMonitor
from steward.serve.protocol import BadRequest
from steward.serve.rollout import RolloutTarget, Routing, rollout_actor

logger = logging.getLogger("steward.serve")
MAX_MIRRORED = 256  # requests queued for the challenger: past that a request is not mirrored, so the champion's
# replica never gathers work for the challenger faster than it can do it
SHADOW_WAIT_S = 0.05  # how long mirrored requests gather before the challenger classifies them in one pass


@dataclass
class Arm:
    name: str  # champion | challenger
    served: ServedModel
    monitor: ReplicaMonitor | None
    stats: ArmStats = field(default_factory=ArmStats)  # since the last sync

    def answered(self, output: Output) -> None:
        """Count a request answered; its latency is its share of the model pass that answered it, the part an arm's
        model decides (the route to it is the same for both arms, and a mirrored request's wait for its pass is
        the shadow's choice)."""
        self.stats.requests += 1
        self.stats.latency_ms.append(output.model_s * 1000)

    def failed(self) -> None:
        self.stats.requests += 1
        self.stats.errors += 1

    def request_ids(self, count: int) -> list[str]:
        """Ids of `count` predictions: signed by the arm's monitor where /feedback takes them."""
        return self.monitor.ids.issue(count) if self.monitor else [uuid.uuid4().hex for _ in range(count)]


class Arms:
    """The champion, and the challenger with the rollout's routing when a rollout is on."""

    def __init__(self, champion: Arm, challenger: Arm | None = None, target: RolloutTarget | None = None) -> None:
        self.champion, self.challenger, self.target = champion, challenger, target
        mode = target.rollout.mode if target else "canary"
        self.routing = Routing(mode, "running", 0.0)  # until the first sync: the champion answers everything
        self.actor = rollout_actor(target) if target else None
        self.syncer: asyncio.Task | None = None
        self.mirrors: list[Mirrored] = []  # champion-answered requests waiting for the challenger's pass
        self.mirroring: asyncio.Task | None = None

    @property
    def all(self) -> list[Arm]:
        return [self.champion, *([self.challenger] if self.challenger else [])]

    def pick(self, headers: Mapping[str, str]) -> Arm:
        """The arm that answers a request with these headers."""
        if self.challenger is None:
            return self.champion
        self._start_syncing()
        return self.challenger if self.routing.answers(self._draw(headers)) == "challenger" else self.champion

    def shadow(self, instances: Any, field: str, attributes: dict, request_ids: list[str], answer: Output) -> None:
        """Queue a request the champion answered for the challenger (shadow mode): the queue is classified in one
        forward pass off the request path, at most every SHADOW_WAIT_S (a pass a request would cost the champion's
        replica ~5x the CPU)."""
        if self.challenger is None or len(self.mirrors) >= MAX_MIRRORED or not self.routing.mirrors(random.random()):
            return
        self.mirrors.append(Mirrored(instances, field, attributes, request_ids, answer))
        if self.mirroring is None:
            self.mirroring = asyncio.get_running_loop().create_task(self._mirror_queued())

    async def _mirror_queued(self) -> None:
        arm = self.challenger
        assert arm is not None
        try:
            while self.mirrors:
                await asyncio.sleep(SHADOW_WAIT_S)  # requests that come meanwhile join this pass
                batch, self.mirrors = self.mirrors, []
                try:
                    outputs = await asyncio.to_thread(_classify, arm.served, batch, arm.monitor is not None)
                except Exception:
                    logger.exception("shadow pass failed")
                    outputs = [None] * len(batch)
                for mirrored, output in zip(batch, outputs, strict=True):
                    if output is None or non_finite_row(output) is not None:
                        arm.failed()  # input the champion answered and the challenger could not
                        continue
                    arm.answered(output)
                    arm.stats.mirrored += len(mirrored.request_ids)
                    agreed = output.probabilities.argmax(-1) == mirrored.answer.probabilities.argmax(-1)
                    arm.stats.agreed += int(agreed.sum())
                    if arm.monitor is not None:
                        arm.monitor.record(output, mirrored.attributes, mirrored.request_ids)
        finally:
            self.mirroring = None

    def run(self, requests: list[tuple[Arm, Any]]) -> list[Output]:
        """Each arm's requests in one forward pass of its model; the outputs in the requests' order."""
        outputs: list[Any] = [None] * len(requests)
        for arm in self.all:
            mine = [i for i, (a, _) in enumerate(requests) if a is arm]
            if mine:
                answers = arm.served.run([requests[i][1] for i in mine], arm.monitor is not None)
                for i, output in zip(mine, answers, strict=True):
                    outputs[i] = output
        return outputs

    async def feedback(self, request_id: str, label: str) -> str:
        """A late label, to the monitor of the arm that issued its id; in shadow mode the challenger's monitor gets
        it too, for the same record it classified."""
        arm = next((a for a in self.all if a.monitor and a.monitor.ids.issued(request_id)), self.champion)
        assert arm.monitor is not None, "/feedback is refused before this when the deployment is not monitored"
        status = await arm.monitor.feedback(request_id, label)
        shadow = self.challenger if self.routing.mode == "shadow" and arm is self.champion else None
        if shadow is not None and shadow.monitor is not None:
            await shadow.monitor.actor.feedback.remote(request_id, label)
        return status

    def _draw(self, headers: Mapping[str, str]) -> float:
        """Where a request falls in [0, 1): a client's sticky header value always falls in the same place in this
        rollout (salted by its id, so each rollout's canary starts with other clients)."""
        header = self.target.rollout.sticky_header if self.target else None
        value = headers.get(header) if header else None
        if not value or self.target is None:
            return random.random()
        digest = hashlib.blake2b(f"{self.target.id}\0{value}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def _start_syncing(self) -> None:
        if self.syncer is None and self.actor is not None:
            self.syncer = asyncio.get_running_loop().create_task(self._sync_forever())

    async def _sync_forever(self) -> None:
        assert self.target is not None
        while True:
            try:
                await self.sync()
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                logger.warning("rollout actor unavailable; keeping the last routing")
            await asyncio.sleep(self.target.rollout.interval_s)

    async def sync(self) -> Routing:
        """Send each arm's counts since the last sync; follow the routing the rollout answers."""
        counts = {}
        for arm in self.all:
            counts[arm.name], arm.stats = arm.stats.to_dict(), ArmStats()
        self.routing = await self.actor.sync.remote(counts)  # type: ignore[union-attr]
        return self.routing


@dataclass(frozen=True)
class Mirrored:
    """A request the champion answered, as the challenger gets it in shadow mode."""

    instances: Any
    field: str
    attributes: dict
    request_ids: list[str]
    answer: Output


def _classify(served: ServedModel, batch: list[Mirrored], embed: bool) -> list[Output | None]:
    """The challenger's outputs for mirrored requests in one forward pass; None for a request it cannot answer."""
    prepared: list[Any] = []
    for mirrored in batch:
        try:
            prepared.append(served.prepare(mirrored.instances, mirrored.field))
        except BadRequest:
            prepared.append(None)
    passed = iter(
        served.run([p for p in prepared if p is not None], embed) if any(p is not None for p in prepared) else []
    )
    outputs: list[Output | None] = []
    for mirrored, ready in zip(batch, prepared, strict=True):
        output = None if ready is None else next(passed)
        try:
            outputs.append(
                output and replace(output, probabilities=served.decide(output.probabilities, mirrored.attributes))
            )
        except BadRequest:
            outputs.append(None)
    return outputs
