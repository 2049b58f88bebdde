"""A run's model as an MLflow pyfunc model, for batch scoring outside steward.

`mlflow.pyfunc.load_model(uri).predict(inputs)` answers as the endpoint's POST /predict does: the same checks and
encoding of raw instances (images as nested lists or arrays, texts as strings), the same model, the same per-group
decision thresholds. The logged model carries steward's own code (code_paths) and the run's servable files (its
`run` artifact), so the scoring side needs steward's dependencies, not steward installed.
"""

import logging
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

# What serving a run needs from its folder; `steward serve --model models:/...` serves these as a run folder.
SERVABLE = ("model", "spec.yaml", "status.json", "metrics.json", "model_card.md", "model_card.json", "curves.png")
RUN_ARTIFACT = "run"  # the artifact holding them, in the logged model
# MLflow's models from code: loading runs this file (steward's own code), never unpickles a Python object
MODEL_CODE = (
    "from mlflow.models import set_model\nfrom steward.serve.pyfunc import StewardModel\n\nset_model(StewardModel())\n"
)
INSTANCES = "instances"  # a DataFrame's column of raw instances; its other columns are group attributes


class StewardModel(PythonModel):
    """Loads the run's model as a replica does; predicts a label and class probabilities per instance."""

    def load_context(self, context: Any) -> None:
        from steward.runs import read_spec
        from steward.serve.model import load_served_model

        run_dir = Path(context.artifacts[RUN_ARTIFACT])
        spec = read_spec(run_dir)
        if spec.model.task != "classification":
            raise ValueError(
                f"{spec.name} is a {spec.model.task} model: the pyfunc model scores classifiers; serve a language "
                "model with `steward serve` (its OpenAI-compatible /v1 API)"
            )
        self.served = load_served_model(spec, run_dir)

    # a DataFrame as MLflow's type hint (it then infers no schema: raw instances have none); lists, arrays and
    # dicts like a /predict body are taken too
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from steward.serve.model import predict_response

        instances, attributes = split_input(model_input)
        probabilities = self.served.decide(self.served.probabilities(instances), attributes)
        reply = predict_response(self.served, "pyfunc", probabilities, [str(i) for i in range(len(instances))])
        return pd.DataFrame(
            {
                "label": [p.label for p in reply.predictions],
                "class_id": [p.class_id for p in reply.predictions],
                "probabilities": [p.probabilities for p in reply.predictions],
            }
        )


def split_input(model_input: Any) -> tuple[list[Any], dict[str, list[Any]]]:
    """Raw instances and group attributes from what a scoring job passes: a DataFrame with an `instances` column
    (other columns are attributes), a dict like a /predict body, an array (one instance per row) or a list."""
    if isinstance(model_input, pd.DataFrame):
        if INSTANCES not in model_input.columns:
            raise ValueError(f"model input: a DataFrame needs an {INSTANCES!r} column of raw instances")
        attributes = {str(c): model_input[c].tolist() for c in model_input.columns if c != INSTANCES}
        return [_plain(x) for x in model_input[INSTANCES]], attributes
    if isinstance(model_input, dict):
        return [_plain(x) for x in model_input[INSTANCES]], dict(model_input.get("attributes") or {})
    return [_plain(x) for x in model_input], {}


def _plain(instance: Any) -> Any:
    return instance.tolist() if isinstance(instance, np.ndarray) else instance


def save_pyfunc(run_dir: Path, into: Path) -> Path:
    """The run's model saved as an MLflow pyfunc model folder under `into` (which must exist)."""
    bundle = Path(tempfile.mkdtemp(dir=into)) / RUN_ARTIFACT  # the folder's name is the artifact's in the model
    bundle.mkdir()
    for name in SERVABLE:
        source = run_dir / name
        if source.is_dir():
            shutil.copytree(source, bundle / name)
        elif source.exists():
            shutil.copy2(source, bundle / name)
    code = bundle.parent / "steward_model.py"
    code.write_text(MODEL_CODE)
    path = into / "model"
    # raw instances have no fixed schema: MLflow's warning that it inferred no signature is not news
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    mlflow.pyfunc.save_model(
        path,
        python_model=str(code),
        artifacts={RUN_ARTIFACT: str(bundle)},
        code_paths=[str(Path(__file__).resolve().parents[1])],  # the steward package itself
        # given, not inferred: inference loads the model in a new process, seconds for what is known already
        pip_requirements=requirements(),
    )
    return path


def requirements() -> list[str]:
    """steward's runtime dependencies, pinned to the versions installed here."""
    pinned = []
    for requirement in metadata.requires("steward") or []:
        if "extra ==" in requirement:
            continue
        name = requirement.split(";")[0].split("[")[0]
        for mark in "<>=!~ ":
            name = name.split(mark)[0]
        pinned.append(f"{name}=={metadata.version(name)}")
    return pinned
