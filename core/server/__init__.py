"""The OpenAI-compatible HTTP API, served from a background thread of the engine's process."""

from .app import create_app
from .launcher import ApiServer, PortInUseError, bind_socket

__all__ = ["ApiServer", "PortInUseError", "bind_socket", "create_app"]
