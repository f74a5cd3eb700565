"""A tiny OpenAI-compatible chat server on 127.0.0.1 (a free port), in a thread, for the augment tests.

`responder(messages) -> str` answers each request (finish_reason "stop"; a (content, finish_reason) tuple sets it); `fail` is a list of HTTP statuses to return first, one per
request (429 with Retry-After: 0), then normal answers; `fail_when(messages)` true: that request is answered 503,
every time. `requests` records every request body received; `max_in_flight` the most requests handled at once.
`hold(n)`: the first requests wait (up to `timeout` s) until n are in flight together, so a client that sends n at
once shows `max_in_flight == n` however the threads are scheduled (one that sends them one by one waits the
timeout once, and shows 1)."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class FakeOpenAI:
    def __init__(self, responder: Callable[[list[dict]], str]) -> None:
        self.responder = responder
        self.fail: list[int] = []
        self.requests: list[dict] = []
        self.fail_when: Callable[[list[dict]], bool] | None = None
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.changed = threading.Condition(self.lock)
        self.hold_for, self.hold_timeout = 0, 0.0

    def hold(self, n: int, timeout: float = 30.0) -> None:
        with self.lock:
            self.hold_for, self.hold_timeout = n, timeout

    def enter(self) -> None:
        with self.changed:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.changed.notify_all()
            if self.hold_for:
                self.changed.wait_for(lambda: self.max_in_flight >= self.hold_for, self.hold_timeout)
                self.hold_for = 0  # held once: the rest go straight through

    def leave(self) -> None:
        with self.changed:
            self.in_flight -= 1

    def handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                fake.enter()
                try:
                    status, payload = self.answer()
                finally:  # in flight until its answer is ready: a sequential client's next request may arrive
                    fake.leave()  # while this handler is still writing, and must not count as a second one
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def answer(self) -> tuple[int, bytes]:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(body)
                    status = fake.fail.pop(0) if fake.fail else 200
                if fake.fail_when is not None and fake.fail_when(body["messages"]):
                    status = 503
                if self.path != "/v1/chat/completions":
                    status = 404
                if status != 200:
                    return status, json.dumps({"error": {"message": f"fake error {status}"}}).encode()
                content = fake.responder(body["messages"])
                finish = "stop"
                if isinstance(content, tuple):  # (content, finish_reason): e.g. "length", or None (not sent)
                    content, finish = content
                return 200, json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                        "choices": [{"index": 0, "finish_reason": finish,
                                                     "message": {"role": "assistant", "content": content}}]}).encode()

        return Handler


@contextlib.contextmanager
def serving(responder: Callable[[list[dict]], str]):
    """Yields (fake, base_url)."""
    fake = FakeOpenAI(responder)
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
