"""Header: what is being served, on what, with which flags, and where the API answers."""

from __future__ import annotations

from typing import Any

from rich.text import Text

from .text_panel import TextPanel

KEY_FLAGS = (
    ("cuda_graph_max_bs", "cuda-graph-max-bs"),
    ("disable_cuda_graph", "disable-cuda-graph"),
    ("max_running_requests", "max-running-requests"),
    ("chunked_prefill_size", "chunked-prefill-size"),
    ("page_size", "page-size"),
    ("speculative_algorithm", "speculative-algorithm"),
    ("max_total_tokens", "max-total-tokens"),
)


def header_text(info: dict[str, Any], api_url: str, status: str) -> Text:
    """Two lines: identity (model, device, dtype, backend, API), then state and key flags."""
    config = info.get("config", {})
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(" llmconsole ", style="bold reverse")
    text.append(f"  {info.get('model', '…')}", style="bold")
    for label, value in (
        ("device", info.get("device")),
        ("dtype", info.get("dtype")),
        ("attention", config.get("attention_backend")),
    ):
        if value is not None:
            text.append(f"  {label} ", style="dim")
            text.append(str(value))
    text.append("  API ", style="dim")
    text.append(f"{api_url}/v1" if api_url else "—", style="bold underline")
    text.append("\n ")
    text.append(status, style="italic")
    for field, flag in KEY_FLAGS:
        value = config.get(field)
        if value is None or value is False:
            continue
        text.append(f" --{flag} ", style="dim")
        text.append("on" if value is True else str(value))
    return text


class EngineHeader(TextPanel):
    DEFAULT_CSS = """
    EngineHeader {
        height: 2; background: $panel; color: $foreground;
        text-wrap: nowrap; text-overflow: ellipsis;
    }
    """

    def show(self, info: dict[str, Any], api_url: str, status: str) -> None:
        text = header_text(info, api_url, status)
        self.set_text(text)
