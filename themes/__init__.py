"""The console's colour themes: `--theme dark|light|high-contrast`.

The console's stylesheet only uses theme variables ($success for CUDA-graph steps, $warning for
eager steps, $accent for prefill, $error for failures), so a theme is just a palette. The
high-contrast one is for projectors: pure black and white, saturated signal colours.
"""

from __future__ import annotations

from textual.theme import Theme

DARK = Theme(
    name="llmconsole-dark",
    primary="#5FAFFF",
    secondary="#AF87FF",
    accent="#5FD7FF",
    success="#5FD75F",
    warning="#FFAF00",
    error="#FF5F5F",
    foreground="#E4E4E4",
    background="#121212",
    surface="#1C1C1C",
    panel="#262626",
    dark=True,
)

LIGHT = Theme(
    name="llmconsole-light",
    primary="#005FAF",
    secondary="#5F00AF",
    accent="#0087AF",
    success="#008700",
    warning="#AF5F00",
    error="#D70000",
    foreground="#1C1C1C",
    background="#FAFAFA",
    surface="#EEEEEE",
    panel="#E4E4E4",
    dark=False,
)

HIGH_CONTRAST = Theme(
    name="llmconsole-high-contrast",
    primary="#FFFF00",
    secondary="#FF00FF",
    accent="#00FFFF",
    success="#00FF00",
    warning="#FF8700",
    error="#FF0000",
    foreground="#FFFFFF",
    background="#000000",
    surface="#000000",
    panel="#000000",
    boost="#FFFFFF",
    dark=True,
    text_alpha=1.0,
)

THEMES: dict[str, Theme] = {"dark": DARK, "light": LIGHT, "high-contrast": HIGH_CONTRAST}
