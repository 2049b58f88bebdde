"""Driver side of a sweep: spec.tune -> a Ray Tune Tuner whose trials each run `steward train`'s training loop.

A trial validates its spec, then trains. A one-worker trial runs the loop in the trial's own process, holding
that worker's resources (steward.train.session says why). A multi-worker trial (0 CPUs on the Tune side) starts
the same TorchTrainer as `steward train`, with the trial's ScalingConfig, so it can be a multi-worker DeepSpeed
job; a Train callback passes every epoch's metrics and checkpoint back to the trial. Either way Tune sees every
epoch's report: schedulers judge each epoch, and PBT can copy checkpoints between trials.

With a URI output_dir (cluster storage) Tune keeps the experiment and the trials' checkpoints at the sweep's URI,
and each trial publishes its own run folder to `<sweep URI>/trials/<trial id>` from its node (steward.storage).
"""

import contextlib
import json
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.train import Checkpoint
from ray.train._internal.session import get_session
from ray.train.v2.api.callback import UserCallback
from ray.tune.execution.placement_groups import PlacementGroupFactory
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.trainable.function_trainable import wrap_function
from ray.util.queue import Queue

from steward import storage
from steward.data import DataInfo
from steward.errors import RunFailed, RunInterrupted, StewardError
from steward.ray_env import check_resources, connect
from steward.runs import run_uri
from steward.spec import JobSpec
from steward.spec.tune import TuneSpec
from steward.train.launch import TrainingError, build_trainer, loop_config, prepare, root_cause
from steward.train.loop import HISTORY, train_loop
from steward.train.session import trial_session, tune_report
from steward.tune.space import param_space, scheduler, search_algorithm, trial_spec

EXPERIMENT = "tune"  # the Tune experiment folder inside the run folder
TRIALS = "trials"  # each trial's own run folder (history, data info, model) inside the run folder
COMPLETED = "completed"  # marks a trial that ran to its end (Tune marks a stopped trial's last result done too)
STARTS = "starts.jsonl"  # each start of a trial: its config and the checkpoint it started from
STOP_GRACE_S = 60.0  # how long a stopped trial may take to abort its Train run


class TuneError(RunFailed):
    """A sweep that ran but produced nothing to keep."""

    what = "sweep failed"


class SweepInterrupted(RunInterrupted):
    """The sweep stopped before every trial finished (Ctrl+C); its state is saved for --resume."""


class _Bridge(UserCallback):
    """Runs in the Train controller: hands each report (metrics of rank 0, its checkpoint) to the Tune trial."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint: Checkpoint | None) -> None:
        controller = ray.get_runtime_context().current_actor  # so a stopped trial can abort its Train run
        self.queue.put((metrics[0], checkpoint, controller))


def run_trial(
    config: dict[str, Any], base: dict[str, Any], tune_section: dict[str, Any], sweep_dir: str, sweep_uri: str | None
) -> None:
    """One Tune trial: the trial's spec, trained here or by a TorchTrainer, each epoch reported to Tune."""
    spec = trial_spec(base, config, TuneSpec.model_validate(tune_section))
    trial_id = tune.get_context().get_trial_id()
    trial_uri = storage.join(sweep_uri, TRIALS, trial_id) if sweep_uri else None
    # Staged on this trial's node for cluster storage (the same folder as the driver's when they share a node).
    trial_dir = storage.staging_dir(trial_uri) if trial_uri else Path(sweep_dir) / TRIALS / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    if trial_uri:  # a restored trial's earlier starts, logged on whichever node ran them
        storage.download(trial_uri, trial_dir, [STARTS])
    info = prepare(spec, trial_dir)
    start = tune.get_checkpoint()  # a restored trial, or a PBT copy of another trial's checkpoint
    with (trial_dir / STARTS).open("a") as log:  # PBT's exploits, visible per trial
        log.write(json.dumps({"time": time.time(), "config": config, "from": start.path if start else None}) + "\n")
    if trial_uri:  # what the workers read (data_info.json, tokenizer/), before they start; rank 0 writes the rest
        names = [p.name for p in trial_dir.iterdir() if storage.copied(p.name) and p.name not in RANK0_FILES]
        storage.upload(trial_dir, trial_uri, names)
    if in_trial_process(spec):
        train_loop(loop_config(spec, trial_dir, info, start, trial_uri), trial_session(spec.distributed.use_gpu))
    else:
        train_with_ray_train(spec, trial_dir, info, start, trial_uri)
    (trial_dir / COMPLETED).touch()
    if trial_uri:
        storage.upload(trial_dir, trial_uri, [COMPLETED])


def in_trial_process(spec: JobSpec) -> bool:
    """A one-worker trial trains in the trial's process; more workers need a Ray Train run (train/session.py)."""
    return spec.distributed.num_workers == 1


def train_with_ray_train(
    spec: JobSpec, trial_dir: Path, info: DataInfo, start: Checkpoint | None, trial_uri: str | None
) -> None:
    """A Ray Train run for the trial; a Train callback passes each epoch's report back to Tune."""
    queue: Queue = Queue(actor_options={"num_cpus": 0})
    # A fresh Train run name per start: Train V2 would otherwise resume its own latest checkpoint, not `start`.
    name = f"{storage.TRIAL_TRAIN_RUN}{secrets.token_hex(3)}"
    trainer = build_trainer(spec, trial_dir, info, name, start, [_Bridge(queue)], run_uri=trial_uri)
    failure: list[BaseException] = []
    fit = threading.Thread(target=_fit, args=(trainer, queue, failure), daemon=True)
    fit.start()
    controller = None
    try:
        while (item := queue.get()) != END:
            metrics, checkpoint, controller = item
            tune_report(metrics, checkpoint)  # Tune copies it into the trial's own storage
    except SystemExit:  # the scheduler stopped this trial before its final epoch: free the workers now
        _abort(controller)
        fit.join(timeout=STOP_GRACE_S)
        raise
    fit.join()
    if failure:
        raise TrainingError(root_cause(failure[0]))


END = (None, None, None)
RANK0_FILES = {HISTORY, "model"}  # a trial's files its Train run's rank 0 publishes


def _fit(trainer, queue: Queue, failure: list[BaseException]) -> None:
    try:
        trainer.fit()
    except BaseException as err:  # re-raised in the trial's own thread
        failure.append(err)
    finally:
        queue.put(END)


def _abort(controller) -> None:
    """Abort a Train run so it frees its workers' placement group now (its cleaner may not reach Ray's state API)."""
    if controller is None:
        return
    # abort ends the controller actor, so the call itself reports the actor gone
    with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        ray.get(controller.abort.remote(), timeout=STOP_GRACE_S)


def trial_trainable(spec: JobSpec, run_dir: Path) -> type:
    """The Tune trainable running run_trial, which waits for a stopped trial to abort its Train run.

    Tune stops a trial (ASHA, median stopping, a PBT exploit, the time budget) by telling the function to stop and
    ending the actor almost at once. The Train run inside would die with it and leave its workers' placement group
    behind, starving the next trials; so cleanup (or reset_config, when Tune reuses the actor for the next trial)
    first gives run_trial up to STOP_GRACE_S to abort it.
    """
    assert spec.tune is not None
    base, section = spec.model_dump(mode="json", exclude={"tune"}), spec.tune.model_dump(mode="json")
    function = tune.with_parameters(
        run_trial, base=base, tune_section=section, sweep_dir=str(run_dir), sweep_uri=run_uri(spec, run_dir)
    )

    class Trial(wrap_function(function)):  # type: ignore[misc]
        def cleanup(self) -> None:
            _finish_previous()
            super().cleanup()

        def reset_config(self, new_config: dict) -> bool:
            # Tune reuses this actor only once the last trial's thread has ended (it waits 2 s, then fails the new
            # trial); a stopped trial first aborts its Train run, which takes longer.
            _finish_previous()
            return super().reset_config(new_config)

    return Trial


def _finish_previous() -> None:
    """Give the trial function up to STOP_GRACE_S to abort its Train run (see trial_trainable)."""
    session = get_session()
    if session is not None and session.training_started:
        session.finish(timeout=STOP_GRACE_S)


def build_tuner(spec: JobSpec, run_dir: Path, callbacks: list, resume: bool = False) -> tune.Tuner:
    """The Tuner for spec.tune, storing into <run>/tune (run_dir, or the run's URI); `resume` restores it from there."""
    assert spec.tune is not None
    trainable = tune.with_resources(trial_trainable(spec, run_dir), trial_resources(spec))
    uri = run_uri(spec, run_dir)  # Tune syncs its state and the trials' checkpoints to a URI itself
    if resume:
        experiment = storage.join(uri, EXPERIMENT) if uri else str(run_dir / EXPERIMENT)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    t = spec.tune
    return tune.Tuner(
        trainable,
        param_space=param_space(t),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            search_alg=search_algorithm(
                t, spec.seed if t.seed is None else t.seed, t.max_concurrent_trials or _fitting_trials(spec)
            ),
            scheduler=scheduler(t, spec.train.epochs),
            num_samples=t.samples,
            time_budget_s=t.time_budget_s,
            # A trial actor imports torch and steward (seconds each time); reusing it is safe because reset_config
            # waits, like cleanup, for the previous trial's Train run to end.
            reuse_actors=True,
            trial_dirname_creator=lambda trial: trial.trial_id,  # tune/<trial id>, as trials/<trial id>
        ),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=uri or str(run_dir), callbacks=callbacks, verbose=0),
    )


def trial_resources(spec: JobSpec) -> Callable[[dict], PlacementGroupFactory]:
    """What Tune reserves for a trial: its one worker's resources when it trains in the trial process, else none
    (the TorchTrainer inside asks for its workers itself; Tune refuses an empty request, hence the 1 MiB)."""
    assert spec.tune is not None
    base, section = spec.model_dump(mode="json", exclude={"tune"}), spec.tune

    def resources(config: dict) -> PlacementGroupFactory:
        try:
            trial = trial_spec(base, config, section)
        except StewardError:  # the trial itself reports its spec's problems, with the usual message
            trial = None
        if trial is None or not in_trial_process(trial):
            return PlacementGroupFactory([{"CPU": 0, "memory": 2**20}])
        dist = trial.distributed
        return PlacementGroupFactory(
            [{"CPU": dist.cpus_per_worker} | ({"GPU": dist.gpus_per_worker} if dist.use_gpu else {})]
        )

    return resources


def _fitting_trials(spec: JobSpec) -> int:
    """How many trials' workers fit on the cluster at once (Tune cannot see the resources Train asks for)."""
    dist = spec.distributed
    kind, per = ("GPU", dist.gpus_per_worker) if dist.use_gpu else ("CPU", dist.cpus_per_worker)
    return max(1, math.floor(ray.cluster_resources().get(kind, 0) / (per * dist.num_workers)))


def tune_callbacks(callbacks: list) -> list:
    """The Tune callbacks of a sweep: the given ones, and the result files steward reads (CSV and JSON).

    Tune would add a TensorBoard writer per trial too; nothing of steward reads its files (the run folder has its
    own curves), so tune_environment turns Tune's automatic loggers off.
    """
    return [*callbacks, CSVLoggerCallback(), JsonLoggerCallback()]


@contextlib.contextmanager
def tune_environment() -> Iterator[None]:
    """Tune's settings for a sweep, which it reads from the environment when the sweep starts."""
    saved = {key: os.environ.get(key) for key in TUNE_ENV}
    os.environ.update({key: os.environ.get(key, value) for key, value in TUNE_ENV.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


TUNE_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",  # with verbose=0: Tune prints nothing, the live table is ours
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # tune_callbacks names the loggers steward needs
}


def sweep(spec: JobSpec, run_dir: Path, address: str | None, callbacks: list, resume: bool = False) -> tune.ResultGrid:
    """Run (or continue) the sweep on the Ray at `address`; per-trial checks happen inside each trial."""
    connect(address, spec)
    check_resources(spec)
    with tune_environment():
        return build_tuner(spec, run_dir, tune_callbacks(callbacks), resume).fit()
