"""What a result was measured on: the machine, the library versions, the spec and code, and the matmul ceiling."""

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

from steward.runs import spec_hash
from steward.spec import JobSpec

LIBRARIES = ("torch", "ray", "deepspeed", "transformers", "steward")
# Fields whose difference makes two results not directly comparable (`steward bench compare` warns on them).


def manifest(spec: JobSpec) -> dict:
    """CPU model and cores, GPU, RAM, library versions, the spec hash and the git commit."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        **{name: _version(name) for name in LIBRARIES},
        "python": platform.python_version(),
        "spec_hash": spec_hash(spec),
        "git_commit": _git_commit(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def matmul_ceiling(size: int, repeats: int = 5) -> dict:
    """The best fp32 FLOP/s of a dense size x size GEMM on every core, the yardstick for achieved FLOP/s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)  # warm-up: thread pool, caches
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {"size": size, "threads": os.cpu_count(), "flops_per_s": 2 * size**3 / best}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The commit of the steward checkout in use (None when installed from a wheel)."""
    here = Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
