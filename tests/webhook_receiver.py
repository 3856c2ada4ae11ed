"""A CRM's webhook endpoint on 127.0.0.1 (http.server in a thread), the way a receiver
should be written: it verifies each request's signature and deduplicates by the
idempotency key. Its answers follow a script ("ok", "500", "timeout") so tests can make
it fail in bursts; a "timeout" processes the event and then answers too late, the case
that makes a sender deliver twice."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import cycle
from typing import Any

from worker.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, verify


class Receiver:
    def __init__(self, secret: bytes, script: list[str] | None = None, *, hang: float = 2.0):
        self.secret = secret
        self.hang = hang
        self._script: Iterator[str] = cycle(script or ["ok"])
        self._lock = threading.Lock()
        self.bodies: dict[str, set[bytes]] = defaultdict(set)
        """Idempotency key -> every distinct body seen with it (processed events only)."""
        self.requests = 0
        self.bad_signatures = 0
        self.aborted = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with owner._lock:
                    owner.requests += 1
                    if len(body) < length:
                        # The sender died mid-request (a SIGKILL between http.client's
                        # send of the headers and of the body): an incomplete request,
                        # dropped unprocessed as any HTTP server does, not a forgery.
                        owner.aborted += 1
                        return
                    action = next(owner._script)
                    signed = verify(owner.secret, self.headers.get(SIGNATURE_HEADER, ""), body)
                    if not signed:
                        owner.bad_signatures += 1
                    elif action != "500":
                        owner.bodies[self.headers.get(EVENT_ID_HEADER, "")].add(body)
                if not signed:
                    self._answer(401)
                elif action == "500":
                    self._answer(500)
                elif action == "timeout":
                    time.sleep(owner.hang)
                    self._answer(200)
                else:
                    self._answer(200)

            def _answer(self, code: int) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up waiting

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/twoway"

    def keys(self) -> set[str]:
        with self._lock:
            return set(self.bodies)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
