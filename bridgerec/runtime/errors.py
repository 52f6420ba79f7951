"""The error taxonomy every layer shares: faults a user causes versus failures that may go away.

`InputError` is the base of every error whose cause is the input: a raw file that is not what it
claims, a configuration value, a dataset that breaks a stage's contract, a warehouse held open by
another tool. Retrying cannot fix one (the same file gives the same error), so the nightly flow fails
at once on it, and every command maps it to one `error:` line and exit code 2. Anything else (an
engine that fails to start, an I/O error, a lost worker) counts as transient: the nightly flow retries
it after its delay, and the commands exit 1.
"""

from __future__ import annotations

EXIT_INPUT = 2  # bad input, config or contract: the user must change something
EXIT_FAILURE = 1  # anything else (a crash, a transient failure that outlived its retries)
EXIT_HELD = 3  # `bridgerec run`: the quality gate held tonight's run back; the serving lists are unchanged


class InputError(ValueError):
    """A failure the user causes and must fix; never retried, exit code 2.

    The message is the one line a user sees: it names the file (and column or row where there is one)
    or the setting, and says what to do.
    """


def input_error_in(exc: BaseException | None) -> InputError | None:
    """The `InputError` that `exc` is or was raised from (its `__cause__`/`__context__` chain), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying could help: False for input, config and contract errors, True otherwise."""
    return input_error_in(exc) is None
