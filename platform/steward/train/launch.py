"""Driver side of training: spec -> checks -> a TorchTrainer on the connected Ray, writing into the run folder."""

import contextlib
import json
import re
import signal
import threading
from pathlib import Path

from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from steward.data import DataInfo, prepare_data
from steward.data.mitigate import check_mitigation
from steward.data.stream import train_stream
from steward.errors import RunFailed, StewardError
from steward.models import check_fits
from steward.ray_env import check_resources, connect
from steward.runs import publish, run_uri
from steward.spec import JobSpec
from steward.storage import join
from steward.train.checkpoint import CheckpointRefused, check_resumable, prune_unrecorded, unrecorded_start
from steward.train.estimate import refuse_unfit
from steward.train.loop import train_loop
from steward.train.strategy import validate_deepspeed


class TrainingError(RunFailed):
    """Training started but a worker failed; the message carries the root cause, not Ray's wrapping."""

    what = "training failed"


def prepare(spec: JobSpec, run_dir: Path) -> DataInfo:
    """Everything checkable before a worker starts: data, model fit, DeepSpeed config."""
    info = prepare_data(spec, run_dir)
    check_mitigation(spec, info)  # a positive label the data has, two classes for thresholds: before any worker
    (run_dir / "data_info.json").write_text(json.dumps(info.to_dict(), indent=2))  # checkpoints rebuild from it
    problems = check_fits(spec.model, info)
    if problems:
        raise StewardError("the model does not fit the data: " + "; ".join(problems))
    validate_deepspeed(spec)
    return info


def build_trainer(
    spec: JobSpec,
    run_dir: Path,
    info: DataInfo,
    name: str = "train",
    initial_checkpoint: Checkpoint | None = None,
    callbacks: list | None = None,
    run_uri: str | None = None,
    probe: dict | None = None,
) -> TorchTrainer:
    """The TorchTrainer for this spec; its storage is the run folder, so resuming is re-running into it.

    `initial_checkpoint` is a checkpoint to start from when the run has none of its own (a Tune trial
    restored or copied by PBT); `callbacks` are Ray Train callbacks (Tune's bridge). With `run_uri` (cluster
    storage) Ray writes checkpoints to that URI and rank 0 publishes its files there (steward.storage).
    `probe` ({warmup, steps}) times steps for `steward bench` and ends training once they are timed.
    """
    dist = spec.distributed
    resources = {"CPU": dist.cpus_per_worker} | ({"GPU": dist.gpus_per_worker} if dist.use_gpu else {})
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config(spec, run_dir, info, initial_checkpoint, run_uri) | {"probe": probe},
        # data.streaming: Ray Train deals each worker an equal shard of the stream (ray.train.get_dataset_shard)
        datasets={"train": train_stream(spec, info)} if spec.data.streaming else None,
        scaling_config=ScalingConfig(
            num_workers=dist.num_workers, use_gpu=dist.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=run_uri or str(run_dir),
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.checkpoint.keep),
        ),
    )


def loop_config(
    spec: JobSpec,
    run_dir: Path,
    info: DataInfo,
    initial_checkpoint: Checkpoint | None = None,
    run_uri: str | None = None,
) -> dict:
    """What `train_loop` is given: the validated spec, where to write, the data's description, where from."""
    return {
        "spec": spec,
        "run_dir": str(run_dir),
        "data_info": info.to_dict(),
        "initial_checkpoint": initial_checkpoint,
        "run_uri": run_uri,
    }


def fit(spec: JobSpec, run_dir: Path, address: str | None = None) -> None:
    """Train the spec into run_dir (new or resumed) with Ray Train on the Ray at `address` (steward.ray_env).

    Everything checkable without Ray is checked before Ray starts. For a URI output_dir, run_dir is the local
    staging folder: what workers read is published before they start.
    """
    info = prepare(spec, run_dir)
    uri = run_uri(spec, run_dir)
    storage = join(uri, "train") if uri else str(run_dir / "train")  # where Ray Train keeps the checkpoints
    check_resumable(storage)
    connect(address, spec)
    check_resources(spec)
    refuse_unfit(spec, info)  # before any worker starts: one that cannot fit would only be killed mid-step
    if uri:
        publish(spec, run_dir)  # data_info.json, tokenizer/: rank 0 may run on another node
    try:
        with interrupted_by_ctrl_c():
            build_trainer(spec, run_dir, info, initial_checkpoint=unrecorded_start(storage), run_uri=uri).fit()
    except Exception as err:  # Ray wraps worker errors; surface the worker's own message
        refused = next((e for e in error_chain(err) if isinstance(e, CheckpointRefused)), None)
        if refused is not None:
            raise CheckpointRefused(str(refused)) from None
        raise TrainingError(explain_failure(err, spec)) from err
    prune_unrecorded(storage)


@contextlib.contextmanager
def interrupted_by_ctrl_c():
    """Ctrl-C while Ray Train runs ends in KeyboardInterrupt (an interrupted run), and after it works as before.

    Ray Train's fit installs a SIGINT handler of its own, which aborts the run's controller and workers and stays
    installed; the driver's wait for the aborted controller then ends in SystemExit(1), not a failure of the run.
    """
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit:
        raise KeyboardInterrupt from None
    finally:
        if before is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before)


# What Ray raises when a worker's process or node goes away (not an error in the training code), and what the
# surviving workers' collectives say when their peer vanished mid-step (gloo: "Connection reset by peer").
LOST_WORKER = {
    "ActorDiedError",
    "RayActorError",
    "ActorUnavailableError",
    "NodeDiedError",
    "OwnerDiedError",
    "WorkerHealthCheckFailedError",
    "WorkerHealthCheckTimeoutError",
    "WorkerCrashedError",
}
PEER_LOST = re.compile(r"connection (reset|closed) by peer|remote process exited|peer .* (closed|disconnected)", re.I)


def explain_failure(err: BaseException, spec: JobSpec) -> str:
    """The message for a failed fit: a lost worker with no restarts left says so and how to recover; else the root
    cause. (Ray restarts the workers from the last checkpoint up to distributed.max_failures times first.)"""
    cause, chain = root_cause(err), error_chain(err)
    lost = {type(e).__name__ for e in chain} & LOST_WORKER or any(PEER_LOST.search(str(e)) for e in chain)
    if not lost:
        return cause
    allowed = spec.distributed.max_failures
    budget = "restarts were all used" if allowed else "allows no restart"
    return (
        f"a worker was lost (its process or node died: {cause}) and distributed.max_failures={allowed} {budget}; "
        "raise distributed.max_failures (e.g. 3) so Ray restarts the workers from the last checkpoint "
        "(train.checkpoint.every_epochs) once the cluster has room for them again"
    )


def error_chain(err: BaseException) -> list[BaseException]:
    """Every exception in a (Ray-wrapped) chain, each rank's failure included."""
    found: list[BaseException] = []
    todo: list = [err]
    while todo:
        seen = todo.pop()
        if not isinstance(seen, BaseException) or any(seen is f for f in found):
            continue
        found.append(seen)
        todo += [getattr(seen, "cause", None), seen.__cause__, getattr(seen, "health_check_failure", None)]
        todo.append(getattr(seen, "_base_exc", None))  # Train V2 wraps a worker's own error with its traceback
        todo += list((getattr(seen, "worker_failures", None) or {}).values())
    return found


def root_cause(err: BaseException) -> str:
    """The innermost error message of a (Ray-wrapped) exception chain."""
    seen = err
    while True:
        inner = getattr(seen, "cause", None) or seen.__cause__
        if isinstance(inner, dict):  # Train V2 keeps per-rank errors in a dict
            inner = next(iter(inner.values()), None)
        if not isinstance(inner, BaseException) or inner is seen:
            break
        seen = inner
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"
