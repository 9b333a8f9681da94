"""Errors lit-align raises on purpose: bad settings, bad data, models or checkpoints that cannot be read.

Each one's message says what is wrong and where (the setting and its valid range; the file, record
and field). ``lit-align`` prints such an error as one line, then a hint line, and exits with
status 1, without a traceback (set ``LIT_ALIGN_DEBUG=1`` to see it); any other exception is a bug
or a library's error and keeps its traceback.
"""

from __future__ import annotations

import os

DEBUG_VARIABLE = "LIT_ALIGN_DEBUG"
"""Environment variable: when set to anything but ``""``/``0``, ``lit-align`` shows the traceback of
its own errors too."""


class LitAlignError(Exception):
    """An error raised on purpose, whose message is the whole story for the user.

    ``hint`` (optional) says what to do; the CLI prints it on the line after the message.
    """

    hint: str | None = None


class SettingError(LitAlignError, ValueError):
    """A setting (or a combination of settings) that cannot work, found when the object holding it is built.

    Args:
        owner: the class holding the setting, e.g. ``"DPO"`` or ``"PreferenceDataModule"``; None
            when ``message`` is the whole text.
        setting: the setting's name inside ``owner`` (dotted for nested settings, e.g.
            ``"optimizer.lr"``), or None for a problem of the whole object.
        message: what is wrong, e.g. ``"must be > 0, got -0.1"``; with ``owner`` and ``setting``
            the full message reads ``"DPO: beta must be > 0, got -0.1"``.
        hint: what to do instead (optional).
    """

    def __init__(self, owner: str | None, setting: str | None, message: str, hint: str | None = None):
        if owner is None:
            text = message
        else:
            text = f"{owner}: {setting} {message}" if setting else f"{owner}: {message}"
        super().__init__(text)
        self.owner, self.setting, self.hint = owner, setting, hint


class NonFiniteLossError(LitAlignError, FloatingPointError):
    """Training stopped on a NaN/inf loss; the message names the method, step and batch and what to try."""


class RewardError(LitAlignError, ValueError):
    """A reward function that returned something other than one finite number per completion; the
    message names the reward, what it returned and for which prompt."""


class CheckpointError(LitAlignError):
    """A checkpoint that cannot be used: missing, unreadable, not Lightning's, or of another method."""


def debugging() -> bool:
    """Whether ``LIT_ALIGN_DEBUG`` asks for tracebacks of lit-align's own errors."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def error_chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and the errors it was raised from (``__cause__``, else ``__context__``), in that
    order, each once: the config parser, for one, wraps a constructor's error in its own."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        chain.append(error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return chain


def find_lit_align_error(error: BaseException) -> LitAlignError | None:
    """``error`` itself or the first :class:`LitAlignError` it was raised from."""
    return next((link for link in error_chain(error) if isinstance(link, LitAlignError)), None)
