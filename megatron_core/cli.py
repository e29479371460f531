"""What every command line of the toolkit shares: user errors in one line, exit status 2.

A *user error* is a mistake in what the user handed over (a missing or malformed file, an invalid
config or ``--set`` key, a missing checkpoint). Entry points answer it with one line on stderr::

    error: <what is wrong, the file or key, and the fix>

and exit with status 2; the Python traceback appears only with ``--debug``. Anything else (a bug)
keeps its traceback. Each entry point runs ``cli.run(main, user_errors=(...))`` from its
``if __name__ == "__main__"`` block, adding its own packages' error classes, so ``main`` itself
still raises (tests and Python callers see the exception).

This module sits on the lowest floor: it imports no other part of the toolkit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import pydantic
import yaml

#: Exit status of a user error (argparse's own choice for bad arguments).
USER_ERROR_STATUS = 2


class UserError(ValueError):
    """A mistake in the user's input; the message names the file, key or value and the fix.

    A ``ValueError`` so that callers catching the errors bad values raised before keep working.
    """


#: Errors that are the user's on every entry point; entry points add their packages' classes.
BASE_USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError,
    pydantic.ValidationError, yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError,
)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``--debug`` and one-line errors (``error: ...``, exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="on an error, show the Python traceback instead of one line")

    def error(self, message: str) -> NoReturn:
        self.exit(USER_ERROR_STATUS, f"error: {message} (see {self.prog} --help)\n")


def format_validation_error(err: pydantic.ValidationError) -> str:
    """A pydantic error as one line: ``invalid Model: a.b: what; c: what``."""
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (see --help for the keys each section accepts)"
        parts.append(f"{where}: {message}" if where else message)
    return f"invalid {err.title}: " + "; ".join(parts)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (KeyError's quotes dropped, pydantic errors condensed)."""
    if isinstance(err, pydantic.ValidationError):
        text = format_validation_error(err)
    elif isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    elif isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None, *,
        user_errors: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """Call ``main(argv)`` and exit: its int result (0 for anything else), or 2 on a user error.

    ``--debug`` anywhere in ``argv`` lets user errors raise with their traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        result = main(args)
    except BASE_USER_ERRORS + user_errors as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
    except BrokenPipeError:  # `... | head`: the reader went away, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
