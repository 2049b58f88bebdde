"""`steward jobs logs --follow`, `jobs stop` and `jobs status` against a real Ray head: plain entrypoint jobs (a
few printed lines, no training) submitted through the Jobs API, followed by the CLI in a fresh interpreter as a user
runs it.

One head for the module (1 CPU, loopback, ports and temp dir of its own so it never meets another Ray on the
machine; token authentication on, with a token of the test's own, so every request must carry it). A head is
enough: a job's driver runs on the head. It is torn down in the fixture's finally, whatever happened.
"""

import asyncio
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from contextlib import suppress
from pathlib import Path

import aiohttp
import pytest
import requests
from typer.testing import CliRunner

from steward.cli import app
from steward.cluster.jobs import job_info, logs, ray_auth_header
from tests.conftest import ROOT
from tests.serving import wait_for

pytestmark = pytest.mark.slow

GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, NODE_PORTS = 6590, 8385, 10031, 14600
API = f"http://127.0.0.1:{DASHBOARD_PORT}"
HEAVY = ("torch", "ray", "deepspeed", "transformers", "datasets")
# The CLI as a user runs it, in a fresh interpreter that leaves behind the names of the modules it loaded.
CLI = """
import atexit, json, sys
loaded = sys.argv[1]
atexit.register(lambda: open(loaded, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["steward", *sys.argv[2:]]
from steward.cli import main
main()
"""
# 300 lines at once (about 21 kB of random text, so compression cannot hide a re-sent log), then a line every 0.1 s
BURST_THEN_TICKS = """
import base64, os, time
for i in range(300):
    print(f"{i:04d} " + base64.b64encode(os.urandom(48)).decode())
for i in range(300, 330):
    time.sleep(0.1)
    print(f"{i:04d} tick")
"""
SLEEPER = "import time; print('up'); time.sleep(600)"


@pytest.fixture(scope="module")
def head():
    temp = Path(f"/tmp/stw-j{os.getpid()}")  # short: Ray's unix sockets live under it
    bin_dir = Path(sys.executable).parent
    token = secrets.token_hex(16)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env = {**os.environ, **auth, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    ports = [f"--node-manager-port={NODE_PORTS}", f"--object-manager-port={NODE_PORTS + 1}",
             f"--dashboard-agent-listen-port={NODE_PORTS + 2}", f"--dashboard-agent-grpc-port={NODE_PORTS + 3}",
             f"--metrics-export-port={NODE_PORTS + 4}", f"--runtime-env-agent-port={NODE_PORTS + 5}",
             f"--min-worker-port={NODE_PORTS + 100}", f"--max-worker-port={NODE_PORTS + 199}",
             f"--port={GCS_PORT}", f"--dashboard-port={DASHBOARD_PORT}",
             f"--ray-client-server-port={CLIENT_PORT}"]  # fmt: skip
    start = [str(bin_dir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
             "--include-dashboard=true", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000",
             f"--temp-dir={temp}/head", "--disable-usage-stats", *ports]  # fmt: skip
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in auth.items():  # the CLI under test finds the token where a user keeps it
                patch.setenv(name, value)
            subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
            yield API
    finally:
        down = {**os.environ, "STEWARD_CLUSTER_TEMP": str(temp)}
        subprocess.run([ROOT / "cluster" / "local-down.sh"], env=down, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def submit(script: str) -> str:
    """Submit `python -u -c SCRIPT` through the Jobs API; its submission id."""
    body = {"entrypoint": f"python -u -c {shlex.quote(script)}"}
    reply = requests.post(f"{API}/api/jobs/", json=body, headers=ray_auth_header(), timeout=30)
    reply.raise_for_status()
    return reply.json()["submission_id"]


def stop_quietly(job_id: str) -> None:
    with suppress(requests.RequestException):
        requests.post(f"{API}/api/jobs/{job_id}/stop", headers=ray_auth_header(), timeout=30)


class Relay:
    """A TCP relay on loopback between the CLI and the Jobs API: counts the connections and what the API sends
    back, and can cut every open connection."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections, self.received_bytes, self.open = 0, 0, []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.server.accept()
            except OSError:
                return  # closed
            far = socket.create_connection(("127.0.0.1", DASHBOARD_PORT))
            with self.lock:
                self.connections += 1
                self.open += [near, far]
            threading.Thread(target=self._pump, args=(near, far, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(far, near, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                if count:
                    with self.lock:
                        self.received_bytes += len(data)
                sink.sendall(data)
        for end in (source, sink):
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            for end in self.open:
                with suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()
        self.cut()


class Following:
    """`steward jobs logs JOB --follow` in a fresh interpreter; its stdout read line by line as it comes."""

    def __init__(self, job_id: str, tmp_path: Path, address: str = API) -> None:
        self.loaded, self.stderr = tmp_path / f"{job_id}.modules.json", tmp_path / f"{job_id}.stderr"
        argv = [sys.executable, "-c", CLI, str(self.loaded), "jobs", "logs", job_id, "--follow", "--address", address]
        with self.stderr.open("w") as err:
            # Ctrl-C as a terminal sends it: pytest-xdist's workers ignore SIGINT, and a child inheriting that
            # would never see it (Python installs no KeyboardInterrupt handler over an ignored SIGINT)
            self.process = subprocess.Popen(
                argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for_line(self, start: str, timeout: float = 60) -> str:
        """The first line printed that starts with `start` (Ray writes lines of its own into a job's log)."""
        found = lambda: next((line for line in list(self.lines) if line.startswith(start)), None)  # noqa: E731
        return wait_for(found, timeout, f"a line {start!r}... in the followed log")

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """Exit code, stdout and stderr once the CLI has returned (killed after `timeout` s: a test failure)."""
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self.process.kill()
        self.reader.join(timeout=10)
        return code, "".join(self.lines), self.stderr.read_text()

    def modules(self) -> list[str]:
        return json.loads(self.loaded.read_text())


@pytest.fixture(scope="module")
def followed(head, tmp_path_factory):
    """A job followed from before it prints until it ends, through a relay that counts what the Jobs API sent."""
    relay = Relay()
    try:
        job_id = submit(BURST_THEN_TICKS)
        following = Following(job_id, tmp_path_factory.mktemp("followed"), relay.url)
        following.wait_for_line("0000 ")
        status_at_first_line = str(job_info(API, job_id).status)
        code, out, err = following.finish()
        return {"job_id": job_id, "code": code, "out": out, "err": err, "log": logs(API, job_id),
                "status_at_first_line": status_at_first_line, "modules": following.modules(),
                "connections": relay.connections, "received_bytes": relay.received_bytes}  # fmt: skip
    finally:
        relay.close()


def test_follow_prints_each_line_once_in_order_as_it_comes(followed):
    assert followed["code"] == 0, followed["err"]
    assert followed["status_at_first_line"] == "RUNNING"  # lines arrive while the job runs, not at its end
    assert followed["out"] == followed["log"]  # stdout is the log, whole, nothing twice
    printed = [line[:4] for line in followed["out"].splitlines() if re.match(r"\d{4} ", line)]  # the job's own
    assert printed == [f"{i:04d}" for i in range(330)]
    assert followed["err"].strip() == f"job {followed['job_id']} SUCCEEDED"
    loaded = followed["modules"]
    assert "aiohttp" in loaded  # the log came over the stream, in an interpreter that stayed light
    assert [m for m in HEAVY if m in loaded] == []


def test_follow_fetches_only_what_is_new(followed):
    # The job runs 3 s after its 21 kB burst: fetching the whole log every second receives it 3 times or more.
    log_bytes = len(followed["log"].encode())
    assert log_bytes > 20_000
    print(f"followed a {log_bytes} B log: {followed['received_bytes']} B over {followed['connections']} connections")
    assert followed["received_bytes"] < 1.2 * log_bytes + 8_000, followed
    assert followed["connections"] <= 3  # the job's status, the stream, the final status


def test_follow_of_a_job_that_fails_exits_1_with_its_status(head):
    job_id = submit("import time; print('working'); time.sleep(1); raise SystemExit(3)")
    shown = CliRunner().invoke(app, ["jobs", "logs", job_id, "--follow", "--address", API])
    assert shown.exit_code == 1, shown.output
    assert "working" in shown.output.splitlines() and f"job {job_id} FAILED" in shown.output
    again = CliRunner().invoke(app, ["jobs", "logs", job_id, "-f", "--address", API])  # ended: one request
    assert again.exit_code == 1 and again.output.splitlines().count("working") == 1


def test_ctrl_c_stops_following_and_jobs_stop_stops_the_job(head, tmp_path):
    job_id = submit(SLEEPER)
    try:
        following = Following(job_id, tmp_path)
        following.wait_for_line("up\n")
        following.process.send_signal(signal.SIGINT)
        code, _, err = following.finish()
        assert code == 130, err
        assert f"stopped following {job_id}; the job goes on" in err and "Traceback" not in err
        assert str(job_info(API, job_id).status) == "RUNNING"
        stopped = CliRunner().invoke(app, ["jobs", "stop", job_id, "--address", API])
        assert stopped.exit_code == 0, stopped.output
        assert stopped.output.strip() == f"{job_id} STOPPED"
        assert str(job_info(API, job_id).status) == "STOPPED"  # stop returned once it was so
        again = CliRunner().invoke(app, ["jobs", "stop", job_id, "--address", API])
        assert again.exit_code == 0 and again.output.strip() == f"{job_id} had already ended: STOPPED"
    finally:
        stop_quietly(job_id)


def test_a_dropped_stream_is_a_clear_error(head, tmp_path):
    job_id, relay = submit(SLEEPER), Relay()
    try:
        following = Following(job_id, tmp_path, relay.url)
        following.wait_for_line("up\n")
        relay.cut()
        code, _, err = following.finish()
        assert code == 2, err
        assert f"the log stream of {job_id} closed while the job is RUNNING" in " ".join(err.split())
        assert "Traceback" not in err
    finally:
        relay.close()
        stop_quietly(job_id)


@pytest.mark.parametrize("command", [["logs"], ["logs", "--follow"], ["status"], ["stop"]])
def test_an_unknown_job_is_a_clear_error(head, command):
    shown = CliRunner().invoke(app, ["jobs", command[0], "no-such-job", *command[1:], "--address", API])
    assert shown.exit_code == 2, shown.output
    assert f"no job 'no-such-job' on {API}; `steward jobs list` shows them" in " ".join(shown.output.split())


def test_a_wrong_token_is_a_clear_error(head, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    shown = CliRunner().invoke(app, ["jobs", "logs", "no-such-job", "--follow", "--address", API])
    assert shown.exit_code == 2, shown.output
    text = " ".join(shown.output.split())
    assert f"--address {API}: the Jobs API answered 403 Forbidden: Invalid authentication token" in text
    assert "give it the cluster's token in $RAY_AUTH_TOKEN" in text


def test_the_log_stream_needs_the_token(head):
    # The head refuses a stream without the token, so a followed log proves the stream sends it.
    async def connect(headers):
        async with aiohttp.ClientSession(headers=headers) as session:
            try:
                async with session.ws_connect(f"{API}/api/jobs/no-such-job/logs/tail"):
                    return 101
            except aiohttp.WSServerHandshakeError as err:
                return err.status

    assert asyncio.run(connect({})) == 401
    assert asyncio.run(connect(ray_auth_header())) == 404
