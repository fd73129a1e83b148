"""Event log: engine start, config changes, restarts, errors, exports, load runs."""

from __future__ import annotations

import datetime as dt

from rich.text import Text
from textual.widgets import RichLog

from llmconsole.core.telemetry import EngineEvent

STYLES = {"error": "bold red", "restart_begin": "yellow", "restart_end": "yellow", "start": "green"}


def event_line(event: EngineEvent) -> Text:
    stamp = dt.datetime.fromtimestamp(event.time).strftime("%H:%M:%S")
    text = Text(no_wrap=False)
    text.append(f"{stamp} ", style="dim")
    text.append(f"{event.kind:<13}", style=STYLES.get(event.kind, "bold"))
    text.append(event.message)
    return text


class EventLog(RichLog):
    DEFAULT_CSS = """
    EventLog { height: 1fr; min-height: 4; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(max_lines=500, wrap=True, markup=False, **kwargs)  # type: ignore[arg-type]

    def add(self, event: EngineEvent) -> None:
        self.write(event_line(event))
