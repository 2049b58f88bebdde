"""Shared fixtures: the environment every test needs, one local Ray (and Serve) shared by the modules that ask
for it, and an S3 server."""

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from steward.ray_env import free_port  # noqa: F401  (the tests' port: claimed, never one the kernel hands out)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Under Serve's HAProxy ingress a deleted application's replica stays 30 s for the proxy to drain it; tests delete
# their applications between them (and the CLIs they start do), so 1 s.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
# `make test` runs two pytest-xdist workers (gw0, gw1), each with a Ray and Serve of its own. Each embedded Serve
# takes free ports for its HAProxy ingress (`ray_env.take_haproxy_ports`); its direct-ingress port ranges are the
# worker's own.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
for _kind, _port in {"HTTP": 30000, "GRPC": 40000}.items():
    os.environ.setdefault(f"RAY_SERVE_DIRECT_INGRESS_MIN_{_kind}_PORT", str(_port + 500 * _WORKER))
    os.environ.setdefault(f"RAY_SERVE_DIRECT_INGRESS_MAX_{_kind}_PORT", str(_port + 500 * _WORKER + 499))

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"


class _Shared:
    """The local Ray (and Serve on it) that the modules asking for `ray_local` share: ray.init (~7 s here), Serve's
    start (~6 s) and their shutdowns are paid once for all of them, not once a module."""

    env: dict[str, str] | None = None  # the environment the running Ray was started with; None: no shared Ray
    serve_port: int | None = None  # Serve's port on it; None: Serve not started
    ray_modules: set[str] = set()  # modules whose tests use ray_local (serve_port asks for it too)
    serve_modules: set[str] = set()


# Set in this process by pytest, or by torch as a test imports its compiler: no Ray process reads them.
NOT_FOR_RAY = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in NOT_FOR_RAY}


def _stop_serve() -> None:
    if _Shared.serve_port is not None:
        import ray
        from ray import serve

        _Shared.serve_port = None
        if ray.is_initialized():  # a test may have ended Ray itself
            serve.shutdown()


def _stop_ray() -> None:
    _stop_serve()
    if _Shared.env is not None:
        import ray

        _Shared.env = None
        ray.shutdown()


# `make test` runs two xdist workers, each taking a whole module at a time in this order: the longest modules go
# first, so that the two finish together instead of one running the last long module alone.
LONGEST_FIRST = ["test_train", "test_cluster_multinode", "test_serve", "test_bench", "test_tune",
                 "test_cluster_storage_tune", "test_monitor_serve", "test_cli", "test_train_resume",
                 "test_train_precision", "test_cluster_storage", "test_responsible_train", "test_serve_generate",
                 "test_registry", "test_data_stream", "test_serve_autoscale", "test_govern_run", "test_tracking",
                 "test_cluster_jobs", "test_checkpoint_integrity", "test_serve_rollout",
                 "test_serve_lm_watch", "test_adapters"]  # fmt: skip


def pytest_collection_modifyitems(session, config, items):
    """The longest modules first, then the others; among the rest, those that use the shared Ray run last, one
    after another, so it starts once and nothing else runs beside it in this process."""
    for item in items:
        if "ray_local" in item.fixturenames:
            _Shared.ray_modules.add(item.module.__name__)
        if "serve_port" in item.fixturenames:
            _Shared.serve_modules.add(item.module.__name__)

    def order(item):
        name = item.module.__name__.rsplit(".", 1)[-1]
        rank = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        return rank, item.module.__name__ in _Shared.ray_modules

    items[:] = sorted(items, key=order)  # stable: a module's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def _shared_ray_ends_with_the_session():
    yield
    _stop_ray()


@pytest.fixture(scope="module", autouse=True)
def _shared_ray_only_where_asked(request):
    """A module that does not ask for the shared Ray (or Serve) does not run beside it."""
    if request.module.__name__ not in _Shared.ray_modules:
        _stop_ray()
    elif request.module.__name__ not in _Shared.serve_modules:
        _stop_serve()


@pytest.fixture(scope="module")
def ray_local():
    """The local Ray the CLI starts (`ray_env.connect`: every core, the dashboard's state API, the workers'
    environment), shared with the other modules that ask for it.

    Ray's processes inherit the environment Ray starts with, so a module whose environment differs from the one the
    running Ray was started with (Serve's proxy mode, a key the workers read) gets a Ray of its own, started anew.
    """
    import ray

    from steward.ray_env import connect

    if _Shared.env is not None and (_Shared.env != _environment() or not ray.is_initialized()):
        changed = sorted(k for k in {*_Shared.env, *_environment()} if _Shared.env.get(k) != os.environ.get(k))
        print(f"\na new shared Ray: the environment changed in {changed}", file=sys.stderr)  # seen with -s
        _stop_ray()
    if _Shared.env is None:
        connect(None)
        _Shared.env = _environment()  # as connect left it: it sets the variables the workers read
    yield ray


@pytest.fixture(scope="module")
def serve_port(ray_local):
    """Serve on a free port, started once on the shared Ray; every application a test deploys is deleted after it."""
    from ray import serve

    if _Shared.serve_port is None:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _Shared.serve_port = port
    yield _Shared.serve_port


@pytest.fixture(autouse=True)
def _delete_serve_apps_after(request):
    """Every Serve application a test deployed is deleted after it, with its monitor actors (as `steward serve
    stop` does): they are detached, and would otherwise live on beside the next tests."""
    yield
    if "serve_port" in request.fixturenames:
        from ray import serve

        from steward.monitor.actor import stop_monitors

        for name in list(serve.status().applications):
            serve.delete(name)
            stop_monitors(name)


def own_processes(title: str) -> list[int]:
    """PIDs of this process's descendants whose title starts with `title`: the workers of a Ray that this test
    process started itself (ray.init's raylet is its child), never another job's processes on the machine."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if (child.cmdline() or [""])[0].startswith(title):
                found.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


STEWARD = [sys.executable, "-m", "steward"]
BUCKET = "steward-runs"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port with one bucket; the URI, the CLI's environment, a pyarrow fs."""
    from moto.server import ThreadedMotoServer
    from pyarrow.fs import S3FileSystem

    saved = {k: os.environ.get(k) for k in AWS}
    os.environ.update(AWS)  # this process reads the bucket too (pyarrow, like the CLI, takes keys from the env)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto keeps its buckets in this process, not in the server: without a reset, a module would see the last one's
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST")).close()
    try:
        fs = S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        query = f"?endpoint_override=127.0.0.1:{port}&scheme=http"
        cache = tmp_path_factory.mktemp("steward-cache")
        env = {**os.environ, **AWS, "STEWARD_CACHE": str(cache), "COLUMNS": "250"}
        yield {"uri": f"s3://{BUCKET}/runs{query}", "query": query, "port": port, "env": env, "fs": fs, "cache": cache}
    finally:
        server.stop()
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})


def steward(s3, *args, timeout=900):
    return subprocess.run([*STEWARD, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=s3["env"])  # fmt: skip


def stored(s3, prefix):
    """Every object path under bucket/prefix in the S3 server."""
    from pyarrow.fs import FileSelector, FileType

    infos = s3["fs"].get_file_info(FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return {i.path.removeprefix(f"{BUCKET}/{prefix}/") for i in infos if i.type == FileType.File}


def read(s3, path):
    with s3["fs"].open_input_stream(f"{BUCKET}/{path}") as stream:
        return stream.read().decode()
