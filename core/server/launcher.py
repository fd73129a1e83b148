"""Run uvicorn on a background thread of this process: start, wait until ready, stop."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ..engine import Engine
from .app import create_app


class PortInUseError(OSError):
    """The requested port is taken; the message says which."""


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind on the caller's thread, so a busy port is a clear error at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUseError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


class ApiServer:
    """The OpenAI-compatible API of one engine. `port=0` picks a free port (see `url`)."""

    def __init__(
        self,
        engine: Engine,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        log_level: str = "warning",
        sock: socket.socket | None = None,
    ) -> None:
        self.engine = engine
        self.host = host
        self.app = create_app(engine, api_key)
        self._socket = sock or bind_socket(host, port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ApiServer:
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="llmconsole-api",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
