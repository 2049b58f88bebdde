"""Shared fixtures: the environment every test needs, and one local Ray per module that asks for it."""

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"


@pytest.fixture(scope="module")
def ray_local():
    """One real local Ray with 2 CPUs for the whole module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def serve_port(ray_local):
    """Serve on a free port for the whole module."""
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": free})
    yield free
    serve.shutdown()


@pytest.fixture(autouse=True)
def _delete_serve_apps_after(request):
    """Every Serve application a test deployed is deleted after it."""
    yield
    if "serve_port" in request.fixturenames:
        from ray import serve

        for name in list(serve.status().applications):
            serve.delete(name)
