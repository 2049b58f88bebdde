"""The `tracking:` section: where a run's parameters, metrics and artifacts are logged (MLflow, TensorBoard), and
whether its model is registered."""

import re

from pydantic import Field

from steward.spec.base import Section

# How a registered model version is named: models:/NAME@ALIAS or models:/NAME/VERSION (NAME: a spec's name).
NAME, ALIAS = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", r"[A-Za-z0-9_-]{1,64}"
MODEL_URI = re.compile(rf"^models:/(?P<name>{NAME})(?:/(?P<version>\d{{1,9}})|@(?P<alias>{ALIAS}))$")


class TrackingSpec(Section):
    enabled: bool = Field(True, description="Log train, tune and bench runs to MLflow.")
    uri: str | None = Field(
        None,
        pattern=r"^(https?://|sqlite:///|file:|databricks)\S*$",
        max_length=2048,
        description="MLflow tracking URI (http(s)://host:port of an MLflow server, sqlite:///path, databricks). "
        "Default: $MLFLOW_TRACKING_URI, else a SQLite store, mlflow.db, in output_dir.",
    )
    experiment: str | None = Field(
        None, min_length=1, max_length=500, description="MLflow experiment name. Default: the spec's name."
    )
    registry: bool = Field(
        True,
        description="Register the model of each succeeded train or tune run in MLflow's model registry under the "
        "spec's name (alias challenger when its gates pass; see steward models).",
    )
    tensorboard: bool = Field(
        False,
        description="Also write TensorBoard event files (per-epoch metrics, step loss) to the run folder's "
        "tensorboard/ (tensorboard --logdir OUTPUT_DIR). Needs the tensorboard package: steward[tensorboard].",
    )
