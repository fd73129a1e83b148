"""A fixed-size panel drawn from one rich Text: repaints in place, never asks for a re-layout
(a `Static.update()` re-lays out the whole screen), and only when the text changed."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget


class TextPanel(Widget):
    _text: Text = Text()

    def set_text(self, text: Text) -> None:
        if text != self._text:
            self._text = text
            self.refresh()

    def render(self) -> Text:
        return self._text
