"""The Textual app: a thin shell that wires a telemetry source to the panels.

The engine never waits for the UI: a timer (10 Hz) asks the paint pacer (console/pacing) whether
the UI thread's CPU budget allows a repaint; when it does, the telemetry ring buffer is drained into
a pure `ConsoleModel` and only what changed is redrawn, the chart every 2-4 s.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Label, ProgressBar

from llmconsole.core.config import ConfigError, EngineConfig
from llmconsole.core.engine import Engine, EngineStoppedError, RestartError, RestartResult
from llmconsole.core.telemetry import EngineEvent, export_session
from llmconsole.themes import THEMES

from .interpreter import ConsoleInterpreter
from .load_runner import LoadOutcome, LoadRunner, LoadSettings
from .pacing import PaintPacer, budget_for
from .recording import Recording
from .screens.flags_editor import FlagsEditor
from .screens.help import HelpScreen
from .screens.load_dialog import LoadDialog
from .screens.request_detail import RequestScreen
from .session import ConsoleOptions, LiveSession
from .sources import EngineSource, ReplaySource, TelemetrySource
from .state import ConsoleModel
from .widgets.event_log import EventLog
from .widgets.gauges import HIT_WINDOW_S, Gauges, GaugeValues
from .widgets.header import EngineHeader
from .widgets.requests_table import RequestsTable
from .widgets.spec_panel import SpecPanel, spec_shape
from .widgets.step_strip import StepStrip
from .widgets.throughput import ThroughputChart


@dataclass(frozen=True)
class Panels:
    """The main screen's widgets, found once (a modal on top must not hide them from the
    refresh timer)."""

    header: EngineHeader
    table: RequestsTable
    strip: StepStrip
    chart: ThroughputChart
    gauges: Gauges
    spec: SpecPanel
    log: EventLog


PALETTE_FLAGS = (
    ("cuda_graph_max_bs", "CUDA-graph max batch size"),
    ("disable_cuda_graph", "CUDA graphs off/on"),
    ("max_running_requests", "max running requests"),
    ("chunked_prefill_size", "chunked-prefill size"),
    ("max_total_tokens", "KV cache size (tokens)"),
    ("attention_backend", "attention backend"),
    ("speculative_algorithm", "speculative algorithm"),
)
REFRESH_S = 0.1  # ≤10 Hz, as the panels promise


def prefix_cache_on(config: dict[str, Any]) -> bool:
    """Whether the described engine (a recording's too) runs the radix prefix cache."""
    return not config.get("disable_radix_cache")


class ConsoleApp(App[None]):
    """Three ways to start: `config` (load an engine, serve the API), `engine` (attach to one
    that runs, e.g. in tests), or `recording` (replay, no engine at all)."""

    TITLE = "llmconsole"
    CSS_PATH = "app.tcss"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("f", "flags", "Flags"),
        Binding("l", "load", "Load"),
        Binding("L", "stop_load", "Stop load"),
        Binding("e", "export", "Export CSV"),
        Binding("s", "screenshot", "Screenshot"),
        Binding("question_mark", "help", "Keys", key_display="?"),
        Binding("space", "pause", "Pause replay", show=False),
        Binding("plus", "speed(2.0)", "Replay faster", show=False, key_display="+"),
        Binding("minus", "speed(0.5)", "Replay slower", show=False, key_display="-"),
    ]

    def __init__(
        self,
        *,
        config: EngineConfig | None = None,
        engine: Engine | None = None,
        recording: Recording | None = None,
        options: ConsoleOptions | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        if sum(x is not None for x in (config, engine, recording)) != 1:
            raise ValueError("give exactly one of config, engine or recording")
        super().__init__()
        self.options = options or ConsoleOptions()
        if self.options.theme not in THEMES:
            raise ValueError(f"unknown theme {self.options.theme!r} (choose {', '.join(THEMES)})")
        for theme in THEMES.values():
            self.register_theme(theme)
        self.theme = THEMES[self.options.theme].name
        self._config = config
        self._sock = sock
        self.session: LiveSession | None = None
        if engine is not None:
            self.session = LiveSession.attach(engine, self.options.record)
        self.source: TelemetrySource | None = None
        if recording is not None:
            self.source = ReplaySource(recording, self.options.replay_speed)
        self.model = ConsoleModel()
        self.load: LoadRunner | None = None
        self.load_settings = self.options.load
        self.load_progress = ""
        self.status = "starting"
        self.startup_error: str | None = None
        # Reads and repaints go together, paced by the UI thread's CPU budget (console/pacing).
        self.pacer = PaintPacer(budget_for(os.cpu_count()))
        self.interpreter = ConsoleInterpreter()  # GIL switch interval, frozen heap
        self._steps_pending = False
        self._console_closed = False
        self.restarting = False

    # ---- layout --------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield EngineHeader(id="header")
        with Horizontal(id="loading"):
            yield Label("starting", id="loading-stage")
            yield ProgressBar(total=1.0, show_eta=False, id="loading-bar")
        with Horizontal(id="body"):
            with Vertical(id="left"):
                yield RequestsTable(id="requests")
                yield StepStrip(id="steps")
            with Vertical(id="right"):
                yield ThroughputChart(id="chart")
                yield Gauges(id="gauges")
                yield SpecPanel(id="spec")
        yield EventLog(id="events")
        yield Footer()

    def on_mount(self) -> None:
        self.interpreter.enter()
        # Once the screen is built, its objects (and an attached engine's) leave the GC's reach.
        self.call_after_refresh(self._freeze_heap)
        q = self.query_one
        self.panels = Panels(
            q(EngineHeader),
            q(RequestsTable),
            q(StepStrip),
            q(ThroughputChart),
            q(Gauges),
            q(SpecPanel),
            q(EventLog),
        )
        self.panels.table.border_title = "running requests (enter: open, x: cancel)"
        self.panels.strip.border_title = "engine steps"
        self.panels.log.border_title = "events"
        self.panels.gauges.border_title = "KV cache, queue, memory (% of copy rate)"
        self.panels.spec.border_title = "speculative decoding"
        if self.session is not None:
            self._session_ready(self.session)
        elif self.source is not None:
            self._replay_ready()
        else:
            self._header()
            self.run_worker(self._start_engine, thread=True, name="engine-start")
        self._timer = self.set_interval(REFRESH_S, self.tick)

    # ---- startup -------------------------------------------------------------------------------

    def _start_engine(self) -> None:
        assert self._config is not None
        try:
            session = LiveSession.start(
                self._config, self._sock, self._report_progress, self.options.record
            )
        except Exception as exc:
            self.call_from_thread(self._start_failed, exc)
            return
        if self._console_closed:  # quit while loading
            session.stop()
            return
        self.call_from_thread(self._engine_started, session)

    def _report_progress(self, stage: str, fraction: float) -> None:
        if not self._console_closed:
            self.call_from_thread(self._show_progress, stage, fraction)

    def _show_progress(self, stage: str, fraction: float) -> None:
        self.query_one("#loading").remove_class("-hidden")
        self.query_one("#loading-stage", Label).update(stage)
        self.query_one("#loading-bar", ProgressBar).update(progress=fraction)
        self.status = stage
        self._header()

    def _start_failed(self, exc: BaseException) -> None:
        self.startup_error = str(exc) or type(exc).__name__
        self.exit(return_code=2)

    def _session_ready(self, session: LiveSession) -> None:
        self.session = session
        self.source = EngineSource(session.engine, session.server.url)
        self.query_one("#loading").add_class("-hidden")
        self.status = "serving"
        self.panels.table.focus()
        self.refresh_all()  # header, spec panel and the rest

    def _engine_started(self, session: LiveSession) -> None:
        self._session_ready(session)
        self.call_after_refresh(self._freeze_heap)  # the engine's objects too

    def _freeze_heap(self) -> None:
        self.interpreter.freeze_heap()
        # Its full collection (~0.2 s) is a one-off: billed to the paint budget, it would hold
        # the first repaints back by up to 2 s.
        self.pacer.forgive()

    def _replay_ready(self) -> None:
        self.query_one("#loading").add_class("-hidden")
        self._header()
        self._spec()
        self.panels.table.focus()

    def _describe(self) -> dict[str, Any]:
        """The source's description, with the flags restarts changed since it was taken."""
        assert self.source is not None
        info = self.source.describe()
        if self.model.config_changes:
            info = {**info, "config": {**info.get("config", {}), **self.model.config_changes}}
        return info

    def _header(self) -> None:
        info = self._describe() if self.source is not None else self._pending_info()
        url = self.source.api_url if self.source is not None else ""
        status = self.status
        if isinstance(self.source, ReplaySource):
            status = self.status = self._replay_status(self.source)
        elif info.get("state") == "restarting" and not self.restarting:
            status = "restarting"  # e.g. over HTTP: POST /v1/engine/restart
        elif self.load is not None and self.load.running and self.load_progress:
            status = f"{status} · {self.load_progress}"
        self.panels.header.show(info, url, status)

    def _pending_info(self) -> dict[str, Any]:
        config = self._config.to_dict() if self._config is not None else {}
        return {"model": config.get("model") or "default model", "config": config}

    @staticmethod
    def _replay_status(source: ReplaySource) -> str:
        position = source.now() - source.recording.started
        length = source.recording.end - source.recording.started
        state = "paused" if source.paused else ("finished" if source.finished else "playing")
        name = source.recording.path.name
        return f"replay {name} ×{source.speed:g} {state} {position:.0f}/{length:.0f} s"

    # ---- refresh -------------------------------------------------------------------------------

    def tick(self) -> None:
        """The 10 Hz timer: read and repaint when the paint budget allows (console/pacing)."""
        if self.source is None or self._console_closed or not self.pacer.due():
            return
        chart = self.pacer.painted()
        now = self._read()
        with self.batch_update():
            self._paint(now, chart=chart)

    def _read(self) -> float:
        """Drain what the source has into the model; returns the source's clock."""
        source = self.source
        assert source is not None
        changes = self.model.apply(source.poll())
        self.model.set_live(source.live_requests())
        for event in changes.events:
            self.panels.log.add(event)
        self._steps_pending |= changes.steps
        return source.now()

    def _paint(self, now: float, chart: bool) -> None:
        self.panels.table.show(self.model.live, now)
        self._gauges(now)
        self._header()
        if self._steps_pending:
            self.panels.strip.show(self.model.steps, self.model.restart_steps)
            if self.model.spec.verify_steps:
                self._spec()
            self._steps_pending = False
        if chart:
            self.panels.chart.show(*self.model.chart_series(now))

    def refresh_all(self) -> None:
        """Read and draw everything now (tests and snapshots call this after a replay seek)."""
        if self.source is None or self._console_closed:
            return
        self.pacer.painted()
        now = self._read()
        self._steps_pending = True
        with self.batch_update():
            self._paint(now, chart=True)
            self._spec()

    def _gauges(self, now: float) -> None:
        info = self._describe()
        config = info.get("config", {})
        used, cached, total = self.model.kv_usage()
        queued = sum(1 for r in self.model.live if r.state == "queued")
        running = len(self.model.live) - queued
        values = GaugeValues(
            # The last step's count predates the frees of the requests it finished.
            kv_used=used if self.model.live else 0,
            kv_cached=cached,
            kv_total=total,
            running=running,
            max_running=int(config.get("max_running_requests") or 0),
            queued=queued,
            tokens_per_s=self.model.tokens_per_s(now),
            finished_ok=self.model.finished_ok,
            finished_failed=self.model.finished_failed,
            prefix_cache=prefix_cache_on(config),
            hit_rate=self.model.prefix_hit_rate(now, HIT_WINDOW_S),
            hit_history=tuple(self.model.hit_rate_series(now, self.model.chart_seconds)),
            read_rate=self.model.decode_read_rate(now),
            read_note=(
                "no decode step lately"
                if self.model.bytes_recorded or not isinstance(self.source, ReplaySource)
                else "not in this recording"
            ),
            copy_rate=info.get("stats", {}).get("memory_copy_bytes_per_s") or None,
        )
        self.panels.gauges.show(values)

    def _spec(self) -> None:
        config = self._describe().get("config", {})
        algorithm = str(config.get("speculative_algorithm") or "none")
        self.panels.spec.show(algorithm, self.model.spec, spec_shape(config))

    # ---- actions -------------------------------------------------------------------------------

    def _live_session(self, what: str) -> LiveSession | None:
        if self.session is None:
            self.notify(
                f"{what}: not available in a replay" if self.source else f"{what}: still starting",
                severity="warning",
            )
        return self.session

    def _log_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """A console event: into the engine's telemetry when live (so it is exported and
        recorded with the rest), straight into the log in a replay."""
        if self.session is not None:
            self.session.engine.log_event(kind, message, data)
        else:
            event = EngineEvent(time.time(), kind, message, data or {})
            self.model.apply([event])
            self.panels.log.add(event)

    def on_requests_table_open(self, message: RequestsTable.Open) -> None:
        if self.source is None:
            return
        cancel = self._cancel if self.session is not None else None
        self.push_screen(RequestScreen(message.rid, self.source.request_detail, cancel))

    def on_requests_table_cancel(self, message: RequestsTable.Cancel) -> None:
        if self._live_session("cancel") is not None:
            self._cancel(message.rid)

    def _cancel(self, rid: str) -> None:
        assert self.session is not None
        self.session.engine.abort(rid)
        self.notify(f"cancelled {rid}")

    def action_flags(self, field: str | None = None) -> None:
        session = self._live_session("flags")
        if session is None:
            return
        if self.restarting:
            self.notify("a restart is running", severity="warning")
            return
        engine = session.engine

        def chosen(changes: dict[str, str] | None) -> None:
            if changes:
                self.restart_engine(changes)

        current = engine.describe()["config"]
        self.push_screen(FlagsEditor(current, engine.plan_restart, field), chosen)

    def restart_engine(self, changes: dict[str, Any]) -> None:
        """Hot-restart on a worker thread; the panels keep refreshing meanwhile."""
        assert self.session is not None
        engine = self.session.engine
        self.restarting = True
        self.status = "restarting"
        self._header()

        def run() -> None:
            try:
                result = engine.restart(changes, progress=self._report_progress)
            except (ConfigError, RestartError, EngineStoppedError) as exc:
                self._call_soon(self._restart_done, None, str(exc))
                return
            self._call_soon(self._restart_done, result, None)

        self.run_worker(run, thread=True, name="restart")

    def _restart_done(self, result: RestartResult | None, error: str | None) -> None:
        self.restarting = False
        self.status = "serving"
        self.query_one("#loading").add_class("-hidden")
        self._header()
        if result is None:
            self.notify(f"restart failed: {error}", severity="error", timeout=10)
        elif result.mode == "live":
            self.notify("flags applied live (no restart needed)")
        else:
            self.notify(f"restarted ({result.mode}): no token for {result.gap_s:.2f} s")

    def action_load(self) -> None:
        session = self._live_session("load")
        if session is None:
            return
        if self.load is not None and self.load.running:
            self.notify("a load is running: L stops it", severity="warning")
            return

        def start(settings: LoadSettings | None) -> None:
            if settings is not None:
                self.start_load(settings)

        self.push_screen(LoadDialog(self.load_settings), start)

    def start_load(self, settings: LoadSettings) -> LoadRunner:
        assert self.session is not None
        self.load_settings = settings
        self.load = LoadRunner(
            settings,
            self.session.server.url,
            self.session.api_key,
            self._load_progress,
            lambda outcome: self._call_soon(self._load_done, outcome),
        ).start()
        self._log_event("load", f"load started: {settings.describe()}")
        return self.load

    def _call_soon(self, fn: Any, *args: Any) -> None:
        # The load may finish while the app is closing: then there is nobody to tell.
        if not self._console_closed:
            try:
                self.call_from_thread(fn, *args)
            except RuntimeError:
                pass

    def _load_progress(self, done: int, total: int) -> None:
        # On the load's thread: one assignment; the header shows it at its next repaint.
        self.load_progress = f"load {done}/{total}"

    def _load_done(self, outcome: LoadOutcome) -> None:
        self.load_progress = ""
        self._log_event("load", outcome.summary())
        self.notify(outcome.summary(), severity="error" if outcome.error else "information")

    def action_stop_load(self) -> None:
        if self.load is None or not self.load.running:
            self.notify("no load is running")
            return
        self.run_worker(self.load.stop, thread=True, name="load-stop")

    def export_folder(self) -> Path:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return self.options.export_dir / f"llmconsole-session-{stamp}"

    def action_export(self) -> Path:
        if self.source is not None:
            self._read()  # include what arrived since the last refresh
        folder = self.export_folder()
        counts = export_session(self.model.session, folder)
        rows = ", ".join(f"{n} {name.removesuffix('.csv')}" for name, n in counts.items())
        self._log_event("export", f"exported {rows} to {folder}", {"path": str(folder)})
        self.notify(f"exported to {folder}")
        return folder

    def action_screenshot(self) -> str:
        self.options.export_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_screenshot(path=str(self.options.export_dir))
        self._log_event("screenshot", f"saved {path}")
        self.notify(f"screenshot saved: {path}")
        return path

    def action_help(self) -> None:
        groups = [("console", list(self.BINDINGS))]
        groups.append(("running requests", list(RequestsTable.BINDINGS)))
        groups.append(("step strip", list(StepStrip.BINDINGS)))
        groups.append(("anywhere", [Binding("ctrl+p", "command_palette", "Command palette")]))
        self.push_screen(HelpScreen(groups))

    def action_pause(self) -> None:
        if isinstance(self.source, ReplaySource):
            self.source.toggle_pause()
            self._header()

    def action_speed(self, factor: float) -> None:
        if isinstance(self.source, ReplaySource):
            self.source.set_speed(min(64.0, max(1 / 16, self.source.speed * factor)))
            self._header()

    def set_console_theme(self, name: str) -> None:
        self.theme = THEMES[name].name
        self.options = replace(self.options, theme=name)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand(
            "Edit engine flags…", "Change flags and hot-restart the engine", self.action_flags
        )
        for field, title in PALETTE_FLAGS:
            yield SystemCommand(
                f"Set {title}…",
                f"--{field.replace('_', '-')}, then hot restart",
                lambda field=field: self.action_flags(field),
            )
        yield SystemCommand("Start a load…", "Fire the built-in load generator", self.action_load)
        yield SystemCommand("Stop the load", "Cancel the running load", self.action_stop_load)
        yield SystemCommand(
            "Export session to CSV", "steps.csv, requests.csv, events.csv", self.action_export
        )
        yield SystemCommand(
            "Save screenshot (SVG)", "Into the export folder", self.action_screenshot
        )
        yield SystemCommand("Show keys", "Every key the console answers to", self.action_help)
        table = self.panels.table
        yield SystemCommand(
            "Cancel the selected request", "Abort it in the engine", table.action_cancel_request
        )
        yield SystemCommand(
            "Open the selected request", "Prompt and text so far", table.action_open_request
        )
        for name in THEMES:
            yield SystemCommand(
                f"Console theme: {name}",
                f"Switch to the {name} theme",
                lambda name=name: self.set_console_theme(name),
            )
        if isinstance(self.source, ReplaySource):
            yield SystemCommand("Pause / resume replay", "space", self.action_pause)

    def on_unmount(self) -> None:
        # However the app ends (tests leave run_test without quitting): interpreter as it was.
        self.interpreter.exit()

    async def action_quit(self) -> None:
        self.shutdown()
        self.exit()

    def shutdown(self) -> None:
        """Stop the load, then the engine and API (when this console started them)."""
        if self._console_closed:
            return
        self._console_closed = True
        self.interpreter.exit()
        if self.load is not None and self.load.running:
            self.load.stop()
        if self.session is not None:
            self.session.stop()
