"""`?`: every key the console answers to, from the live bindings (never a stale copy)."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static


def keys_table(groups: list[tuple[str, list[Binding]]]) -> Table:
    table = Table(box=None, show_header=False, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for title, bindings in groups:
        table.add_row(f"[underline]{title}[/underline]", "")
        seen: set[str] = set()
        for b in bindings:
            if b.description and b.key not in seen:
                seen.add(b.key)
                table.add_row(b.key_display or b.key, b.description)
    return table


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical {
        width: 72; height: auto; max-height: 90%; border: thick $primary; background: $surface;
        padding: 1 2;
    }
    """
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close"),
        Binding("q", "dismiss", "Close"),
    ]

    def __init__(self, groups: list[tuple[str, list[Binding]]]) -> None:
        super().__init__()
        self.table = keys_table(groups)

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("[b]Keys[/b]  (every action is also in the command palette, ctrl+p)\n")
            yield Static(self.table)
            yield Static("\n[dim]escape closes[/dim]")
