"""llmconsole.core: the serving engine and its API; never imports the console."""

# First: installs its finder before anything imports transformers (see the module).
from . import checkout_shadow  # noqa: F401
from .config import ConfigError, EngineConfig
from .engine import Engine, RequestError
from .outputs import Delta, GenerationResult, RequestHandle, Usage
from .sampling_params import SamplingParams
from .telemetry import EngineEvent, LiveRequest, RequestRecord, StepRecord

__all__ = [
    "ConfigError",
    "Delta",
    "Engine",
    "EngineConfig",
    "EngineEvent",
    "GenerationResult",
    "LiveRequest",
    "RequestError",
    "RequestHandle",
    "RequestRecord",
    "SamplingParams",
    "StepRecord",
    "Usage",
]
