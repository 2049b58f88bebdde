"""Fast tier: the `tune` section is checked before Ray starts, and maps onto Ray Tune objects without eval."""

import subprocess
import sys
import time

import pytest
import yaml
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

from steward.spec import SpecError, load_job
from steward.tune.space import param_space, trial_spec
from tests.conftest import JOBS, ROOT

ASHA = JOBS / "tune-digits-asha.yaml"


def problems(tmp_path, tune: dict, job=ASHA) -> dict[str, str]:
    raw = yaml.safe_load(job.read_text())
    raw["tune"] = tune
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SpecError) as err:
        load_job(path)
    return {p.path: f"{p.message} [line {p.line}]" for p in err.value.problems}


def space(**paths) -> dict:
    return {
        "metric": "val_accuracy",
        "mode": "max",
        "search_space": {k.replace("__", "."): v for k, v in paths.items()},
    }


def test_a_misspelled_path_names_the_field_its_line_and_the_fix(tmp_path):
    found = problems(tmp_path, space(train__optimizer__lrr={"loguniform": [1e-4, 1e-2]}))
    message = found["tune.search_space.train.optimizer.lrr"]
    assert "no field `lrr` in train.optimizer; did you mean `lr`?" in message and "[line " in message


@pytest.mark.parametrize(
    ("dist", "fragment"),
    [
        ({"choice": [0, 64]}, "value 0 makes the spec invalid: model.params.hidden_size"),
        ({"uniform": [64, 32]}, "low must be below high"),
        ({"choice": [64], "grid": [32]}, "give exactly one of"),
        ({"qrandint": [32, 128, 0]}, "q must be > 0"),
    ],
)
def test_bad_distributions_are_refused(tmp_path, dist, fragment):
    found = problems(tmp_path, space(model__params__hidden_size=dist))
    assert any(fragment in message for message in found.values()), found


def test_loguniform_needs_a_positive_low(tmp_path):
    found = problems(tmp_path, space(train__optimizer__lr={"loguniform": [0.0, 1e-2]}))
    assert "low must be > 0" in found["tune.search_space.train.optimizer.lr"]


@pytest.mark.parametrize(
    ("extra", "path", "fragment"),
    [
        ({"metric": "val_acc"}, "tune.metric", "does not report 'val_acc'; use one of"),
        ({"search": "grid"}, "tune.search", "grid search needs grid or choice values"),
        ({"search": "optuna", "search_space": {"distributed.zero_stage": {"grid": [1, 2]}}}, "tune.search", "choice"),
        ({"scheduler": {"name": "asha", "max_t": 99}}, "tune.scheduler.max_t", "trials stop at train.epochs"),
        ({"scheduler": {"name": "pbt"}, "search": "optuna"}, "tune.search", "pbt explores by itself"),
        ({"scheduler": {"name": "pbt", "hyperparam_mutations": ["seed"]}}, "tune.scheduler.hyperparam_mutations", ""),
        ({"scheduler": {"name": "asha", "bogus": 1}}, "tune.scheduler.bogus", "unknown key"),
        ({"scheduler": {"name": "hyperband"}}, "tune.scheduler.name", "use fifo, asha, pbt or median_stopping"),
    ],
)
def test_conflicting_tune_settings_are_refused(tmp_path, extra, path, fragment):
    tune = space(train__optimizer__lr={"loguniform": [1e-4, 1e-2]}) | extra
    found = problems(tmp_path, tune)
    assert path in found and fragment in found[path], found


def test_untunable_fields_and_sections_are_refused(tmp_path):
    found = problems(tmp_path, space(output_dir={"choice": ["a", "b"]}))
    assert "output_dir cannot be varied" in found["tune.search_space.output_dir"]


def test_a_search_space_path_can_be_overridden_with_set():
    spec = load_job(ASHA, ["tune.search_space.train.optimizer.lr={uniform: [0.001, 0.002]}"])
    assert spec.tune and spec.tune.search_space["train.optimizer.lr"].uniform == (0.001, 0.002)
    with pytest.raises(SpecError, match="did you mean `lr`"):
        load_job(ASHA, ["tune.search_space.train.optimizer.lrr={uniform: [0.001, 0.002]}"])


def test_each_kind_maps_onto_its_ray_tune_domain():
    spec = load_job(ASHA, ["tune.search_space.distributed.num_workers={grid: [1, 2]}"])
    assert spec.tune
    mapped = param_space(spec.tune)
    assert isinstance(mapped["train.optimizer.lr"], Float)
    assert isinstance(mapped["train.optimizer.lr"].get_sampler(), LogUniform)
    assert isinstance(mapped["model.params.hidden_size"], Categorical)
    assert mapped["distributed.num_workers"] == {"grid_search": [1, 2]}
    grid = load_job(ASHA, ["tune.search=grid", "tune.search_space={model.params.hidden_size: {choice: [32, 64]}}"])
    assert grid.tune and param_space(grid.tune) == {"model.params.hidden_size": {"grid_search": [32, 64]}}
    ints = load_job(ASHA, ["tune.search_space={model.params.hidden_size: {qrandint: [32, 128, 32]}}"])
    assert ints.tune and isinstance(param_space(ints.tune)["model.params.hidden_size"], Integer)


def test_a_trial_spec_is_validated_and_pbt_perturbations_are_brought_back_into_range():
    spec = load_job(ASHA, ["tune.search_space={model.params.hidden_size: {qrandint: [32, 128, 32]}}"])
    assert spec.tune
    base = spec.model_dump(mode="json", exclude={"tune"})
    trial = trial_spec(base, {"model.params.hidden_size": 76.8}, spec.tune)  # PBT: 64 * 1.2
    assert trial.model.params.hidden_size == 64 and trial.tune is None
    assert trial_spec(base, {"model.params.hidden_size": 500}, spec.tune).model.params.hidden_size == 128
    uniform = load_job(ASHA)
    assert uniform.tune
    dropout = trial_spec(
        uniform.model_dump(mode="json", exclude={"tune"}), {"model.params.dropout": 0.36}, uniform.tune
    )
    assert dropout.model.params.dropout == 0.3


def test_cli_refuses_an_invalid_search_space_before_ray_starts(tmp_path):
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "steward",
            "tune",
            str(ASHA),
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            "tune.search_space.model.params.hidden_sizes={choice: [32]}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "did you mean `hidden_size`?" in done.stderr and "Traceback" not in done.stderr
    assert "Ray" not in done.stdout + done.stderr and not any(tmp_path.iterdir())
    assert time.monotonic() - started < 60
