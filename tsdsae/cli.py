"""How every command line tool of the project ends on an expected error: one line on stderr,
exit status 2, no traceback.

    @cli_main
    def main(argv=None) -> int: ...

Expected errors are the project's own (a location that cannot be used, a damaged shard, audio or
a checkpoint that cannot be used, a missing dataset split, a bad configuration value) and
`UsageError` raised by a tool itself. Anything else is a defect and keeps its traceback.
Ctrl-C ends with status 130 and one line, after the tool's own cleanup (finished work is kept by
the tools themselves: checkpoints, shards, MLflow runs marked KILLED).
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# (module, class) of the project's expected errors. Looked up in sys.modules when an exception
# arrives: an error of a module that was never imported cannot have been raised, and the tools
# do not pay for importing modules they do not use.
EXPECTED = (
    ("tsdsae.storage", "StorageError"),
    ("tsdsae.checkpoint", "CheckpointError"),
    ("tsdsae.trainer", "TrainingDiverged"),
    ("tsdsae.data", "ShardError"),
    ("tsdsae.inference", "AudioError"),
    ("data_prep.audio", "BadAudio"),
    ("data_prep.audio", "RenderError"),
    ("data_prep.shards", "PrepInterrupted"),
)


class UsageError(Exception):
    """A problem the user can fix (bad arguments, an existing run, missing input): the message
    says what and how; the tool exits with status 2."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """The expected error classes among the modules imported so far, plus ValueError (bad
    configuration values and arguments) and FileNotFoundError (a named input is missing)."""
    found: list[type[BaseException]] = [UsageError, ValueError, FileNotFoundError]
    for module, name in EXPECTED:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def message(exc: BaseException) -> str:
    """The one-line text of an expected error (a KeyError's message without its quotes)."""
    from tsdsae.storage import redact_text      # no credential of a URL reaches the console

    if isinstance(exc, KeyError) and exc.args:
        return redact_text(str(exc.args[0]))
    return redact_text(str(exc).strip() or type(exc).__name__)


def cli_main(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a tool's `main(argv=None)`: expected errors print `error: <message>` on stderr and
    return 2; KeyboardInterrupt prints `interrupted` and returns 130; otherwise the tool's own
    return value (see exit_status)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> Any:
        try:
            status = main(*args, **kwargs)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as exc:   # noqa: BLE001 - re-raised unless it is an expected error
            if not isinstance(exc, expected_errors()):
                raise
            print(f"error: {message(exc)}", file=sys.stderr)
            return EXIT_USAGE
        return status
    return wrapper


def exit_status(result: Any) -> int:
    """The process exit status of a main's return value: an int as it is, anything else (None,
    the path of what was written) 0."""
    return result if isinstance(result, int) else 0
