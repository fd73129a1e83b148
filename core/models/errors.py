"""Errors raised while resolving and loading models.

Kept in their own module so the CLI can catch them and print one clean line without importing
torch-heavy model code.
"""

from __future__ import annotations


class ModelNotFoundError(Exception):
    """`--model` names nothing usable on this machine (path, HF cache entry or shape)."""


class UnsupportedModelError(Exception):
    """The model exists but its architecture (or file layout) is one the engine cannot run."""
