"""Which run a deployment serves, and the spec it is served with. Driver side: no Ray, no model loaded."""

from pathlib import Path

from steward.errors import StewardError
from steward.runs import list_runs, read_spec
from steward.spec import JobSpec
from steward.storage import fetch_run, is_uri, join

NO_SERVE_SECTION = "serve: the spec has no serve section; add one (e.g. `serve: {route_prefix: /digits}`)"


def find_run(spec: JobSpec, run: Path | None = None, option: str = "--run") -> Path:
    """`run` when given (checked), else the newest succeeded run of this spec's name under its output_dir.

    With a URI output_dir (cluster storage) the newest succeeded run there is downloaded to its local staging
    folder first (steward.storage.fetch_run).
    """
    if spec.serve is None:
        raise StewardError(NO_SERVE_SECTION)
    if run is not None:
        if not (Path(run) / "model" / "model.json").exists():
            raise StewardError(
                f"{option} {run}: not a finished run folder (no model/model.json); pass runs/<name>/<id>"
            )
        return Path(run).resolve()
    uri = is_uri(spec.output_dir)
    for summary in list_runs(spec.output_dir if uri else Path(spec.output_dir)):
        if summary.name != spec.name or summary.state != "succeeded":
            continue
        if uri:
            return fetch_run(join(spec.output_dir, spec.name, summary.path.name), "output_dir")
        if (summary.path / "model").is_dir():
            return summary.path.resolve()
    raise StewardError(
        f"no succeeded run of {spec.name!r} under {spec.output_dir}/; train it first (steward run SPEC) or pass --run"
    )


def serving_spec(spec: JobSpec, run_dir: Path) -> JobSpec:
    """The run's own spec (data and model as trained) with the serve and monitor sections of `spec`.

    The explain section (POST /explain's settings and caps) is `spec`'s when it has one, else the run's.
    """
    if spec.serve is None:
        raise StewardError(NO_SERVE_SECTION)
    run_spec = read_spec(run_dir)
    explain = spec.explain or run_spec.explain
    return run_spec.model_copy(update={"serve": spec.serve, "monitor": spec.monitor, "explain": explain})
