"""How the command line ends on an error: one line for what a user can fix, a traceback for a bug.

Errors a user can fix (a bad ``--bits``, an unknown task, missing data, an empty prompt, ...) end as
one line on stderr, ``kvstream: error: <problem and fix>``, with exit code 2 and no traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import typer
from rich.text import Text
from typer._click.exceptions import ClickException, UsageError
from typer.core import TyperGroup

from kvstream.cli.console import err, note
from kvstream.config import ConfigError
from kvstream.registry import PluginError

EXIT_USAGE = 2
F = TypeVar("F", bound=Callable[..., Any])


class CliError(ValueError):
    """A problem with what the user asked for; the message names it and says how to fix it."""


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def error_line(message: str) -> None:
    """Print ``kvstream: error: message`` as exactly one line on stderr."""
    line = Text.assemble(("kvstream: error: ", "bold red"), one_line(message))
    err().print(line, soft_wrap=True, markup=False)


def fail(message: str) -> typer.Exit:
    """Report ``message`` and return the exit to raise: ``raise fail("...")``."""
    error_line(message)
    return typer.Exit(EXIT_USAGE)


def _raised_in_kvstream(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` belongs to kvstream (our own validation), not a library."""
    tb = exc.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("kvstream")


def _user_error_types() -> tuple[type[BaseException], ...]:
    from kvstream.data.store import DataError
    from kvstream.tasks.base import TaskDataMissing

    return (CliError, ConfigError, PluginError, DataError, TaskDataMissing)


def describe_error(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (keep its traceback)."""
    if isinstance(exc, _user_error_types()):
        return str(exc) or exc.__class__.__name__
    if isinstance(exc, FileNotFoundError):
        name = exc.filename or str(exc)
        return f"file not found: {name} (check the path)"
    if isinstance(exc, ValueError) and _raised_in_kvstream(exc):
        return str(exc)
    return None


def handle_errors(func: F) -> F:
    """Turn the errors a user can fix into one stderr line and exit code 2; let bugs through."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            note(Text("interrupted: finished work is stored, nothing half-written is left behind", style="yellow"))
            raise typer.Exit(130) from None
        except Exception as exc:
            message = describe_error(exc)
            if message is None:
                raise
            raise fail(message) from None

    return wrapper  # type: ignore[return-value]


class KvstreamGroup(TyperGroup):
    """The app's command group: usage errors as one ``kvstream: error:`` line instead of a panel."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except ClickException as exc:
            if not standalone_mode:
                raise
            if exc.__class__.__name__ == "NoArgsIsHelpError":
                exc.show()
                sys.exit(exc.exit_code)
            message = exc.format_message()
            if isinstance(exc, UsageError) and exc.ctx is not None:
                message = f"{message.rstrip('.')} (see `{exc.ctx.command_path} --help`)"
            error_line(message)
            sys.exit(exc.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            error_line("aborted")
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)
