"""Errors the runtime raises for problems a user can fix; the CLI prints them and exits 2."""

from __future__ import annotations


class EdgeRuntimeError(Exception):
    """Base class: the message names the problem and, where it can, what is allowed."""


class InvalidInputError(EdgeRuntimeError, ValueError):
    """A request's text, settings or voice prompt is not acceptable."""


class ModelNotFoundError(EdgeRuntimeError, FileNotFoundError):
    """No model where we looked; the message lists the places and how to get it."""


class RequestFailedError(EdgeRuntimeError, RuntimeError):
    """A request could not complete (e.g. out of memory after every fallback); the runtime lives on."""
