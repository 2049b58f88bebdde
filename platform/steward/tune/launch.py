"""Driver side of a sweep: spec.tune -> a Ray Tune Tuner whose trials each run `steward train`'s own TorchTrainer.

A trial is a small function on the Tune side (0 CPUs) that validates its spec, then starts the same TorchTrainer
as `steward train`, with the trial's ScalingConfig (so a trial can be a multi-worker DeepSpeed job). A Train
callback passes every epoch's metrics and checkpoint back to the trial, which reports them to Tune: schedulers
see every epoch, and PBT can copy checkpoints between trials.
"""

import math
import secrets
import threading
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.train import Checkpoint
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue

from steward.spec import JobSpec
from steward.spec.tune import TuneSpec
from steward.train.launch import TrainingError, build_trainer, check_resources, connect, prepare, root_cause
from steward.tune.space import param_space, scheduler, search_algorithm, trial_spec

EXPERIMENT = "tune"  # the Tune experiment folder inside the run folder
TRIALS = "trials"  # each trial's own run folder (history, data info, model) inside the run folder


class TuneError(RuntimeError):
    """A sweep that ran but produced nothing to keep."""


class SweepInterrupted(ValueError):
    """The sweep stopped before every trial finished (Ctrl+C); its state is saved for --resume."""


class _Bridge(UserCallback):
    """Runs in the Train controller: hands each report (metrics of rank 0, checkpoint path) to the Tune trial."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint: Checkpoint | None) -> None:
        self.queue.put((metrics[0], checkpoint.path if checkpoint else None))


def run_trial(config: dict[str, Any], base: dict[str, Any], tune_section: dict[str, Any], sweep_dir: str) -> None:
    """One Tune trial: the trial's spec, trained by a TorchTrainer, each epoch reported to Tune with its checkpoint."""
    spec = trial_spec(base, config, TuneSpec.model_validate(tune_section))
    trial_dir = Path(sweep_dir) / TRIALS / tune.get_context().get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)
    info = prepare(spec, trial_dir)
    start = tune.get_checkpoint()  # a restored trial, or a PBT copy of another trial's checkpoint
    queue: Queue = Queue(actor_options={"num_cpus": 0})
    # A fresh Train run name per start: Train V2 would otherwise resume its own latest checkpoint, not `start`.
    trainer = build_trainer(
        spec, trial_dir, info, f"train-{secrets.token_hex(3)}", start.path if start else None, [_Bridge(queue)]
    )
    failure: list[BaseException] = []
    fit = threading.Thread(target=_fit, args=(trainer, queue, failure), daemon=True)
    fit.start()
    while (item := queue.get()) != (None, None):
        metrics, path = item
        tune.report(metrics, checkpoint=Checkpoint.from_directory(path) if path else None)
    fit.join()
    if failure:
        raise TrainingError(root_cause(failure[0]))


def _fit(trainer, queue: Queue, failure: list[BaseException]) -> None:
    try:
        trainer.fit()
    except BaseException as err:  # re-raised in the trial's own thread
        failure.append(err)
    finally:
        queue.put((None, None))


def build_tuner(spec: JobSpec, run_dir: Path, callbacks: list, resume: bool = False) -> tune.Tuner:
    """The Tuner for spec.tune, storing into run_dir/tune; `resume` restores an interrupted one from there."""
    assert spec.tune is not None
    base, section = spec.model_dump(mode="json", exclude={"tune"}), spec.tune.model_dump(mode="json")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, tune_section=section, sweep_dir=str(run_dir)),
        # No CPU: the TorchTrainer inside the trial asks for its workers itself. (Tune refuses an empty request.)
        {"cpu": 0, "memory": 2**20},
    )
    if resume:
        return tune.Tuner.restore(str(run_dir / EXPERIMENT), trainable, resume_unfinished=True, resume_errored=True)
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
        ),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(run_dir), callbacks=callbacks, verbose=0),
    )


def _fitting_trials(spec: JobSpec) -> int:
    """How many trials' workers fit on the cluster at once (Tune cannot see the resources Train asks for)."""
    dist = spec.distributed
    kind, per = ("GPU", dist.gpus_per_worker) if dist.use_gpu else ("CPU", dist.cpus_per_worker)
    return max(1, math.floor(ray.cluster_resources().get(kind, 0) / (per * dist.num_workers)))


def sweep(spec: JobSpec, run_dir: Path, address: str | None, callbacks: list, resume: bool = False) -> tune.ResultGrid:
    """Run (or continue) the sweep; per-trial checks happen inside each trial."""
    connect(address, spec)
    check_resources(spec)
    return build_tuner(spec, run_dir, callbacks, resume).fit()
