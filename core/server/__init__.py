"""The OpenAI-compatible HTTP API, served from a background thread of the engine's process."""

from .app import create_app
from .launcher import ApiServer, PortInUseError

__all__ = ["ApiServer", "PortInUseError", "create_app"]
