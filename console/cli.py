"""The `llmconsole` command line (typer). Errors print one line, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from llmconsole.core.config import ConfigError, EngineConfig

from .flags import engine_flags

app = typer.Typer(
    name="llmconsole",
    help="An operator's console for LLM serving, on its own paged-KV engine. With no command it "
    "opens the console: engine + OpenAI API in this process, every step live.",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: speed is measured, never asserted.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

err = Console(stderr=True)


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from llmconsole.core.engine import RequestError, RestartError
    from llmconsole.core.models.errors import ModelNotFoundError, UnsupportedModelError

    return (
        CliError,
        ConfigError,
        RequestError,
        RestartError,
        ModelNotFoundError,
        UnsupportedModelError,
        PermissionError,
    )


def start_engine(config: EngineConfig, quiet: bool = False) -> Any:
    """Load the engine with a progress line on stderr."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from llmconsole.core import Engine

    if quiet:
        return Engine(config)
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("loading model", total=1.0)

        def progress(stage: str, fraction: float) -> None:
            bar.update(task, description=stage, completed=fraction)

        return Engine(config, progress=progress)


@app.command()
@engine_flags
def generate(
    prompt: str = typer.Argument(..., help="the prompt"),
    max_tokens: int = typer.Option(128, help="most tokens to generate"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(-1),
    sampling_seed: int | None = typer.Option(None, help="per-request sampling seed"),
    stop: list[str] = typer.Option([], help="stop string (repeatable)"),
    chat: bool = typer.Option(True, help="wrap the prompt in the model's chat template"),
    *,
    config: EngineConfig,
) -> None:
    """Stream one answer to the terminal."""
    from llmconsole.core import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=sampling_seed,
            stop=tuple(stop),
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    engine = start_engine(config)
    try:
        use_chat = chat and getattr(engine.tokenizer, "chat_template", None)
        ids = (
            engine.apply_chat_template([{"role": "user", "content": prompt}])
            if use_chat
            else prompt
        )
        out = Console()
        final = None
        for delta in engine.submit(ids, params):
            out.print(delta.text, end="", soft_wrap=True, highlight=False, markup=False)
            final = delta
        out.print()
        if final is not None and final.error:
            raise CliError(final.error)
        if final is not None and final.usage is not None:
            err.print(
                f"[dim]{final.usage.prompt_tokens} prompt + {final.usage.completion_tokens} "
                f"generated tokens, finish: {final.finish_reason}[/dim]"
            )
    finally:
        engine.shutdown()


@app.command()
@engine_flags
def serve(*, config: EngineConfig) -> None:
    """Run the engine and the OpenAI-compatible API headless (no console); Ctrl-C stops."""
    import signal
    import threading

    from llmconsole.core.server import ApiServer, PortInUseError, bind_socket

    try:
        # Bind before loading the model: a busy port fails in a second, not after a load.
        sock = bind_socket(config.host, config.port)
    except PortInUseError as exc:
        raise CliError(str(exc)) from None
    try:
        engine = start_engine(config)
    except BaseException:
        sock.close()
        raise
    server = ApiServer(engine, config.host, config.port, config.api_key, sock=sock)
    server.start()
    err.print(f"serving {engine.model_name} at [bold]{server.url}/v1[/bold]  (Ctrl-C to stop)")
    stop = threading.Event()
    # Both set here, not left to Python's defaults: a shell that starts `serve` in the
    # background without job control hands it SIGINT ignored, and Ctrl-C must still stop it.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        # Engine first: in-flight requests end with a final "error" chunk, then the API closes.
        engine.shutdown()
        server.stop()
        err.print("stopped")


THEME_HELP = "dark | light | high-contrast (for projectors)"
RECORD_OPTION = typer.Option(None, "--record", help="write the session as JSONL while it runs")
LOAD_DATASET_OPTION = typer.Option(
    None, help="built-in load (l): a ShareGPT JSON file instead of the built-in prompts"
)
EXPORT_DIR_OPTION = typer.Option(
    Path("."), "--export-dir", help="where e (CSV export) and s (screenshot) write"
)


def _check_theme(theme: str) -> None:
    from llmconsole.themes import THEMES

    if theme not in THEMES:
        raise CliError(f"unknown theme {theme!r} (choose {', '.join(THEMES)})")


def _run_app(console_app: Any) -> None:
    try:
        console_app.run()
    finally:
        console_app.shutdown()
    if console_app.startup_error:
        raise CliError(console_app.startup_error)


@app.callback()
@engine_flags
def console(
    ctx: typer.Context,
    theme: str = typer.Option("dark", help=THEME_HELP),
    record: Path | None = RECORD_OPTION,
    export_dir: Path = EXPORT_DIR_OPTION,
    load_concurrency: int = typer.Option(8, help="built-in load (l): requests in flight"),
    load_requests: int = typer.Option(32, help="built-in load (l): number of requests"),
    load_max_tokens: int = typer.Option(64, help="built-in load (l): max tokens each"),
    load_dataset: Path | None = LOAD_DATASET_OPTION,
    *,
    config: EngineConfig,
) -> None:
    """Open the console (when no command is given)."""
    if ctx.invoked_subcommand is not None:
        return
    from llmconsole.core.server import PortInUseError, bind_socket

    from .app import ConsoleApp
    from .load_runner import LoadSettings
    from .session import ConsoleOptions

    _check_theme(theme)
    if load_dataset is not None and not load_dataset.is_file():
        raise CliError(f"--load-dataset: no ShareGPT file at {load_dataset}")
    try:
        load = LoadSettings(
            load_concurrency,
            load_requests,
            load_max_tokens,
            None if load_dataset is None else str(load_dataset),
        )
    except ValueError as exc:
        raise CliError(f"--load-{exc}") from None
    try:
        sock = bind_socket(config.host, config.port)  # a busy port fails before the app opens
    except PortInUseError as exc:
        raise CliError(str(exc)) from None
    options = ConsoleOptions(theme=theme, record=record, export_dir=export_dir, load=load)
    _run_app(ConsoleApp(config=config, options=options, sock=sock))


@app.command()
def replay(
    recording: Path = typer.Argument(..., help="a JSONL file written with --record"),
    speed: float = typer.Option(1.0, help="playback speed (space pauses, +/- change it)"),
    theme: str = typer.Option("dark", help=THEME_HELP),
    export_dir: Path = EXPORT_DIR_OPTION,
) -> None:
    """Play a recorded session in the console, without an engine."""
    from .app import ConsoleApp
    from .recording import RecordingError, read_recording
    from .session import ConsoleOptions

    _check_theme(theme)
    if not speed > 0:
        raise CliError(f"--speed must be > 0, got {speed}")
    try:
        rec = read_recording(recording)
    except RecordingError as exc:
        raise CliError(str(exc)) from None
    options = ConsoleOptions(theme=theme, export_dir=export_dir, replay_speed=speed)
    _run_app(ConsoleApp(recording=rec, options=options))


@app.command("export")
def export_cmd(
    recording: Path = typer.Argument(..., help="a JSONL file written with --record"),
    out: Path | None = typer.Option(None, help="folder for the CSVs (default: next to the file)"),
) -> None:
    """Write a recorded session as steps.csv, requests.csv and events.csv."""
    from llmconsole.core.telemetry import export_session

    from .recording import RecordingError, read_recording

    try:
        rec = read_recording(recording)
    except RecordingError as exc:
        raise CliError(str(exc)) from None
    folder = out or recording.with_suffix("")
    counts = export_session(rec.records(), folder)
    rows = ", ".join(f"{n} rows in {name}" for name, n in counts.items())
    Console().print(f"{folder}: {rows}", highlight=False, soft_wrap=True)


def _register_bench() -> None:
    from .bench import register

    register(bench_app, engine_flags, start_engine)


def run(fn: Callable[[], Any]) -> int:
    import click

    try:
        fn()
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        return 130
    except _user_errors() as exc:
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def main() -> None:
    _register_bench()
    sys.exit(run(lambda: app(standalone_mode=False)))


if __name__ == "__main__":
    main()
