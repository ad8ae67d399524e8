"""The operator's API requests wait as long as a loaded API server needs, not a fixed 10 s."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from collections.abc import Iterator

import kubernetes
import pytest

from colo_agent.timeouts import RequestTimeout
from colo_operator.kube import Kube, KubeError

DELAY = 0.6  # every answer takes this long


class SlowHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(DELAY)
        body = json.dumps({"kind": "Secret", "metadata": {"name": "k"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up on this one
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_a_timed_out_request_is_asked_again_with_a_longer_timeout(slow_server: str) -> None:
    # With a fixed timeout below what the server needs, every try was abandoned (and the
    # API server cancels the handler of an abandoned request): no progress, ever.
    configuration = kubernetes.client.Configuration()
    configuration.host = slow_server
    kube = Kube(kubernetes.client.ApiClient(configuration), timeout_s=0.2)
    tries = 0
    while True:
        tries += 1
        try:
            assert await kube.get("Secret", "ns", "k") is not None
            break
        except KubeError as exc:
            assert "Timeout" in str(exc)
            assert tries < 5, "the timeout never grew past what the server needs"
    assert tries >= 2  # 0.2 s and 0.4 s timed out; 0.8 s was enough
    assert kube.timeout.current >= 2 * DELAY  # then it stays where the server's answers are
    kube.close()


def test_request_timeouts_stay_within_their_bounds() -> None:
    timeout = RequestTimeout(10.0, 60.0)
    for expected in (20.0, 40.0, 60.0, 60.0):
        timeout.timed_out()
        assert timeout.current == expected
    timeout.answered(0.05)
    assert timeout.current == 10.0
    timeout.answered(12.0)
    assert timeout.current == 24.0
    with pytest.raises(ValueError):
        RequestTimeout(0, 1)
