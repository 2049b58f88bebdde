"""Shared fixtures: the environment every test needs, one local Ray per module that asks for it, and an S3 server."""

import os
import socket
import subprocess
import sys
import urllib.request
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
