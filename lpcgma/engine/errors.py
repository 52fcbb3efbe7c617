"""Errors of the engine that the command-line faces catch (no torch import, so the CLI starts fast)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path."""


__all__ = ["CheckpointError"]
