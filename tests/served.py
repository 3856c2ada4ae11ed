"""A real `twoway serve` process on 127.0.0.1 and a small HTTP client with a cookie jar."""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from tests.conftest import twoway_cmd
from tests.imap_server import free_port


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str


class Served:
    """`twoway --config CFG serve` on a free port, stopped with SIGTERM by `stop`."""

    def __init__(self, cfg: Path, env: dict[str, str] | None = None, port: int = 0) -> None:
        self.port = port or free_port()
        self.log = cfg.parent / f"serve-{self.port}.log"
        full_env = {**os.environ, **(env or {})}
        full_env.pop("TWOWAY_CONFIG", None)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                twoway_cmd(cfg, "serve", "--port", str(self.port)),
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"twoway serve exited: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("twoway serve did not start listening within 30 s")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self) -> Client:
        return Client(self.port)


@dataclass
class Client:
    """One browser-like visitor: keeps cookies, never follows redirects."""

    port: int
    cookies: dict[str, str] = field(default_factory=dict)
    always: dict[str, str] = field(default_factory=dict)
    """Headers sent with every request (X-Forwarded-For: who this visitor is, via a proxy)."""

    def request(
        self,
        method: str,
        path: str,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        hdrs = {**self.always, **(headers or {})}
        if form is not None:
            body = urlencode(form).encode()
            hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
        if self.cookies:
            hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", errors="replace")
            for name, value in resp.getheaders():
                if name.lower() == "set-cookie":
                    key, _, rest = value.partition("=")
                    val = rest.split(";", 1)[0]
                    if val in ("", "null") or "max-age=0" in value.lower():
                        self.cookies.pop(key, None)
                    else:
                        self.cookies[key] = val
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, text)
        finally:
            conn.close()

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, form: dict[str, str]) -> Reply:
        return self.request("POST", path, form=form)

    def csrf(self, path: str = "/login") -> str:
        """The CSRF token in the form of the page at `path`."""
        page = self.get(path)
        m = re.search(r'name="csrf" value="([^"]+)"', page.body)
        assert m, f"no CSRF field in {path}: {page.status} {page.body[:300]}"
        return m.group(1)

    def login(self, password: str) -> Reply:
        return self.post("/login", {"csrf": self.csrf(), "password": password, "next": "/console"})
