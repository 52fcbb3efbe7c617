"""Errors of the data layer: a dataset that is not where it should be, or files that are not valid."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or file is missing; the message says what to download and where to put it."""


class DataError(ValueError):
    """A dataset file is present but invalid (unreadable, wrong size, bad values); the message names it."""
