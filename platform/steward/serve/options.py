"""What Ray Serve is told about a spec's application: its name, its deployment's options, the builder a Serve config
file names. No Ray and no torch: `steward k8s` writes RayServices from these."""

from typing import Any

from steward.spec import JobSpec
from steward.spec.serve import ServeSpec

# Serve config files and RayServices build the application through this function (steward.serve.app).
APP_BUILDER = "steward.serve.app:app_builder"
DEPLOYMENT = "ModelServer"


def app_name(job: JobSpec) -> str:
    """The Serve application's name: serve.name, else the job's name."""
    return (job.serve.name if job.serve else None) or job.name


def deployment_options(cfg: ServeSpec) -> dict[str, Any]:
    """Serve deployment options from the serve section: replicas or autoscaling, resources, queue depth."""
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
        # Ray 2.60 is moving the load-report interval from the autoscaling config (still read by replicas, which
        # report their own load under the HAProxy ingress) to environment variables: set both.
        interval = str(cfg.autoscaling.metrics_interval_s)
        env = {f"RAY_SERVE_{kind}_AUTOSCALING_METRIC_PUSH_INTERVAL_S": interval for kind in ("REPLICA", "HANDLE")}
        options["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    else:
        options["num_replicas"] = cfg.num_replicas or 1
    return options
