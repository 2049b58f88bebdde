"""What the monitor actor's process does beside its windows: runs at low priority, keeps the deployment's request-id
key, and posts events to a webhook. No Ray."""

import contextlib
import json
import logging
import os
import urllib.request
from pathlib import Path

# Monitoring is background work: where the monitor and a replica want the same core, the replica should win.
# At nice 10 the kernel gives the monitor about a tenth of a contended core, far more than it needs.
NICE = 10
logger = logging.getLogger("steward.monitor")


def id_key(folder: Path) -> bytes:
    """The deployment's request-id key: made once, readable by its owner only, written whole or not at all."""
    path = folder / "request-ids.key"
    if not path.exists():
        partial = path.with_suffix(".partial")
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            out.write(os.urandom(32))
        partial.replace(path)
    return path.read_bytes()


def lower_priority() -> None:
    """Nice every thread of this process (Linux sets niceness per thread; threads started later inherit it)."""
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except FileNotFoundError:  # no /proc (macOS): there niceness is per process
        threads = [0]
    for tid in threads:
        with contextlib.suppress(AttributeError, OSError):  # Windows has no setpriority; a thread may have ended
            os.setpriority(os.PRIO_PROCESS, tid, NICE)


def post(url: str, event: dict) -> None:
    request = urllib.request.Request(
        url, json.dumps(event).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        urllib.request.urlopen(request, timeout=5).close()
    except OSError as err:  # a webhook that is down must not stop the monitor
        logger.warning("webhook %s failed: %s", url, err)
