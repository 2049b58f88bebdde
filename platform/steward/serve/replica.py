"""What a replica is given and opens: its `ReplicaConfig` (the sections it needs as plain data, validated once where
the application is built, never the job spec) and its arms (the champion's model, and during a rollout the
challenger's, each with its monitor)."""

from dataclasses import dataclass

from steward.serve.arms import Arm, Arms
from steward.serve.model import ModelSource, ServedModel, model_source, open_served_model
from steward.serve.monitoring import RecordQueue, ReplicaMonitor, monitor_target
from steward.serve.options import app_name
from steward.serve.quantize import GateResult
from steward.serve.rollout import Challenger, RolloutTarget
from steward.spec import JobSpec
from steward.spec.explain import ExplainSpec
from steward.spec.monitor import MonitorSpec
from steward.spec.serve import ServeSpec


@dataclass(frozen=True)
class ReplicaConfig:
    """What a replica needs: its deployment's name and serve section, the model to load, the explain and monitor
    sections, and during a rollout the challenger's model and the rollout."""

    name: str
    serve: ServeSpec
    model: ModelSource
    explain: ExplainSpec | None = None
    monitor: MonitorSpec | None = None
    challenger: ModelSource | None = None
    rollout: RolloutTarget | None = None


def replica_config(
    spec: JobSpec, run_dir: str, gate: GateResult | None = None, challenger: Challenger | None = None
) -> ReplicaConfig:
    """The replicas' part of `spec` for serving `run_dir` (with int8, the accuracy gate runs here unless `gate` holds
    its result: QuantizationRefused before any replica starts), and a rollout's challenger beside it."""
    model = model_source(spec, run_dir, gate)
    second, target = (challenger.model, challenger.target) if challenger else (None, None)
    return ReplicaConfig(app_name(spec), spec.serve or ServeSpec(), model, spec.explain, spec.monitor, second, target)


def open_arms(replica: ReplicaConfig) -> Arms:
    """The replica's models, each with its own monitor (judging it against its own reference) when monitored."""

    def arm(name: str, served: ServedModel) -> Arm:
        return Arm(name, served, _monitor(replica, served, name))

    champion = arm("champion", open_served_model(replica.model))
    challenger = arm("challenger", open_served_model(replica.challenger)) if replica.challenger else None
    return Arms(champion, challenger, replica.rollout)


def _monitor(replica: ReplicaConfig, served: ServedModel, arm: str) -> ReplicaMonitor | None:
    if replica.monitor is None:
        return None
    target = monitor_target(replica.monitor, replica.serve, replica.name, served.run_dir, served.gate is not None, arm)
    bias = replica.monitor.bias
    return ReplicaMonitor(target, lambda bins: RecordQueue(served, bins, bias))
