"""Errors of the serving layer (all are CmathErrors, so callers catch one type)."""

from __future__ import annotations

from cmath_runtime.errors import CmathError


class ServeError(CmathError):
    """The server cannot be set up or started: the message says what is wrong and how to fix it."""


class ConversationLimitError(CmathError):
    """A new conversation was refused because the live-conversation limit is reached (nothing was evicted)."""


class SequenceError(CmathError):
    """A step for a conversation the server does not hold (never started, ended, or expired after idling)."""


class RequestError(CmathError):
    """The server refused a request as bad (its message names the field); sending it again cannot help."""


class UnreachableError(ServeError):
    """No answer from the server or balancer after the client's bounded retries."""
