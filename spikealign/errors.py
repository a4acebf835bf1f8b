"""One exception for user mistakes, and the way entry points report it.

Library code raises :class:`UserError` with a one-line message that names the problem and the fix.
Entry points wrap ``main`` in :func:`exit_on_user_error`, so users see ``error: <message>`` and exit
status 2 instead of a traceback, and parse their arguments with :class:`OneLineParser`, whose
usage errors look the same. :func:`warn` prints the one-line ``warning: <message>`` of a run that
goes on. Programming errors still raise normally.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(ValueError):
    """A mistake in what the user asked for (bad file, bad shape, unknown name...)."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Decorate an entry point: UserError (and KeyboardInterrupt) become a one-line exit."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            # Under torchrun every rank meets the same mistake; one line is enough.
            if os.environ.get("RANK", "0") == "0":
                sys.stderr.write(f"error: {one_line(err)}\n")
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            raise SystemExit(130) from None

    return wrapper


def one_line(err: UserError) -> str:
    """The message of ``err``; for one re-raised from a DataLoader worker (whose message is the
    worker's whole traceback, ending in "spikealign.errors.UserError: <message>") its last line."""
    message = str(err)
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    prefix = f"{UserError.__module__}.{UserError.__qualname__}: "
    return last[len(prefix) :] if last.startswith(prefix) else last


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like the library's UserError."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message}; see {self.prog} --help\n")
        raise SystemExit(2)


def warn(message: str) -> None:
    """One line ``warning: <message>`` on stderr: the run goes on, but the user should know."""
    sys.stderr.write(f"warning: {' '.join(message.split())}\n")
