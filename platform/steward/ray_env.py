"""The one home of the Ray session: start or join it, what every Ray process's environment holds, what fits.

Every command that needs Ray calls `connect` once; the stages below it (training, sweeps, serving) assume a
connected driver. Ray itself is imported only inside the functions, so light commands never load it.
"""

import os
import shutil
import socket
from collections.abc import Mapping

from steward.errors import ClusterUnreachable, StewardError
from steward.spec import JobSpec
from steward.spec.serve import ServeSpec

# Ray's high-throughput Serve mode: HAProxy as the ingress and requests sent straight to replicas
# (benchmarks/serve_overhead.py measures it against the default proxy).
HIGH_THROUGHPUT = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# The machine-wide ports Serve's HAProxy ingress binds (Ray's defaults), which another Serve here may hold.
HAPROXY_PORTS = {
    "RAY_SERVE_HAPROXY_STATS_PORT": 8404,
    "RAY_SERVE_HAPROXY_METRICS_PORT": 9101,
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500,
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 9500,
}
# Passed on from the driver to every worker and replica when set.
INHERITED = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "OMP_NUM_THREADS")


def is_local(address: str | None) -> bool:
    """Whether `address` means an embedded Ray started (and ended) by this process."""
    return address in (None, "", "local")


def worker_env(spec: JobSpec | None) -> dict[str, str]:
    """Environment every Ray process of the job needs: the DeepSpeed accelerator, no phoning home, offline hubs."""
    use_gpu = spec is not None and spec.distributed.use_gpu
    env = {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
    # Each ray.train.report waits for the controller's next poll of the workers (2 s by default); polling more
    # often costs CPU the workers would use, so 1 s is the compromise.
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.0")
    # Workers mask the data again as they load it, so a hash key named by privacy.hash_key_env must reach them
    # (through Ray's runtime environment, never through the spec or the run folder).
    key_env = spec.privacy.hash_key_env if spec is not None and spec.privacy else None
    for key in (*INHERITED, *([key_env] if key_env else [])):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def prefer_high_throughput(cfg: ServeSpec | None) -> bool:
    """Turn on Ray's high-throughput Serve mode for `cfg` when haproxy is installed and the user has not chosen.

    Serve reads these variables when its processes start, so this acts only before an embedded Ray starts; a joined
    cluster keeps its own setting. Returns whether the mode is on for Rays started from now on.
    """
    if cfg is not None and "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ and shutil.which("haproxy"):
        os.environ.update(HIGH_THROUGHPUT)
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"


def take_haproxy_ports() -> None:
    """Give an embedded Serve's HAProxy ingress Ray's default ports, or free ones where another Serve on this
    machine holds them; ports the user set stay as set. Serve reads them when its processes start."""
    for name, default in HAPROXY_PORTS.items():
        if name not in os.environ and not _bindable(default):
            os.environ[name] = str(_free_port())


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def connect(address: str | None, spec: JobSpec | None = None) -> None:
    """Keep the current Ray connection, else start an embedded Ray (`address` None) or join `auto` / ray://host:port.

    The embedded Ray is started for what `spec` needs: its workers' environment and, with a serve section, Serve's
    high-throughput mode. Raises ClusterUnreachable when nothing answers at `address`.
    """
    import ray

    if ray.is_initialized():
        return
    env = worker_env(spec)
    if is_local(address):
        # Train's preemption watcher, an actor (a process start) per run, only logs drains of other nodes.
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        if prefer_high_throughput(spec.serve if spec is not None else None):
            take_haproxy_ports()
        os.environ.update(env)  # the embedded Ray's controller inherits the driver's environment
        # The dashboard serves Ray's state API, which Train's placement-group cleaner needs to free a stopped
        # run's workers (a trial stopped by a Tune scheduler), and `serve status` / `serve deploy` use.
        ray.init(num_cpus=os.cpu_count(), include_dashboard=True, log_to_driver=False, runtime_env={"env_vars": env})
        return
    try:
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env})
    except ConnectionError as err:
        raise ClusterUnreachable(
            f"--address {address}: cannot reach a Ray cluster there ({err}); start one with `ray start --head` "
            "or check the address"
        ) from None


def resource_problem(spec: JobSpec, have: Mapping[str, float]) -> str | None:
    """What the spec's workers ask for that a cluster with resources `have` lacks (GPUs first), or None."""
    dist = spec.distributed
    per = {"GPU": dist.gpus_per_worker} if dist.use_gpu else {}
    per["CPU"] = dist.cpus_per_worker
    short = [
        f"asks for {dist.num_workers} workers x {amount:g} {kind}, the cluster has {have.get(kind, 0):g} {kind}s"
        for kind, amount in per.items()
        if have.get(kind, 0) < dist.num_workers * amount
    ]
    if not short:
        return None
    return f"distributed.num_workers: {'; '.join(short)}; lower num_workers or the per-worker resources"


def check_resources(spec: JobSpec) -> None:
    """Refuse up front what the connected cluster cannot hold (Ray would otherwise wait forever for the workers)."""
    import ray

    problem = resource_problem(spec, ray.cluster_resources())
    if problem:
        raise StewardError(problem)
