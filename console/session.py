"""What a live console owns: the engine, the API server on its thread, the session recorder.

`LiveSession.start` runs on a worker thread (it loads the model); `attach` wraps an engine that
already runs (tests, `bench console`), which the session then does not shut down.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from llmconsole.core.config import EngineConfig
from llmconsole.core.engine import Engine
from llmconsole.core.model_loader import Progress
from llmconsole.core.server import ApiServer

from .load_runner import LoadSettings
from .recording import SessionRecorder


@dataclass(frozen=True)
class ConsoleOptions:
    theme: str = "dark"
    record: Path | None = None  # write the session as JSONL while it runs
    export_dir: Path = Path(".")  # where `e` and `s` write
    replay_speed: float = 1.0
    load: LoadSettings = LoadSettings()  # what the load dialog (l) starts with


class LiveSession:
    def __init__(
        self,
        engine: Engine,
        server: ApiServer,
        owns_engine: bool,
        record: Path | None = None,
    ) -> None:
        self.engine = engine
        self.server = server
        self.owns_engine = owns_engine
        self.recorder: SessionRecorder | None = None
        if record is not None:
            self.recorder = SessionRecorder(
                record, engine.subscribe(), engine.live_requests, engine.describe(), server.url
            ).start()

    @classmethod
    def start(
        cls,
        config: EngineConfig,
        sock: socket.socket | None,
        progress: Progress,
        record: Path | None = None,
    ) -> LiveSession:
        engine = Engine(config, progress=progress)
        try:
            progress("starting the API server", 0.99)
            server = ApiServer(engine, config.host, config.port, config.api_key, sock=sock).start()
        except BaseException:
            engine.shutdown()
            raise
        return cls(engine, server, owns_engine=True, record=record)

    @classmethod
    def attach(cls, engine: Engine, record: Path | None = None) -> LiveSession:
        """Serve an engine that already runs, on a free loopback port."""
        server = ApiServer(engine, "127.0.0.1", 0, engine.config.api_key).start()
        return cls(engine, server, owns_engine=False, record=record)

    @property
    def api_key(self) -> str | None:
        return self.engine.config.api_key

    def stop(self) -> None:
        """Engine first (in-flight requests end with a final chunk), then the API, then the
        recorder, which so captures the shutdown event."""
        if self.owns_engine:
            self.engine.shutdown()
        self.server.stop()
        if self.recorder is not None:
            self.recorder.stop()
