"""Run work in batches so one bad input never costs the rest: a failing batch is retried with backoff
(transient trouble), then split in halves, recursively, until the inputs that still fail stand alone
and are reported one by one."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from bridgerec.runtime.logs import get_logger

T = TypeVar("T")
R = TypeVar("R")

# Exceptions after which every further call fails too: stop the stage (its checkpoints keep the work).
# StageStalled: the stall watchdog stopping the stage (runtime/watchdog.py), never a batch's fault.
FATAL = {"EngineDeadError", "EngineGenerateError", "MemoryError", "StageStalled"}
# The request itself is bad (e.g. a prompt longer than the context): retrying cannot help, split at once.
PERMANENT = {"VLLMClientError", "ValueError", "TypeError"}


def _kinds(exc: BaseException) -> set[str]:
    """Class names of the exception and of what it wraps (a step error keeps the model's error as cause)."""
    names: set[str] = set()
    while exc is not None:
        names |= {c.__name__ for c in type(exc).__mro__}
        exc = exc.__cause__  # type: ignore[assignment]
    return names


@dataclass(frozen=True)
class Failed(Generic[T]):
    unit: T
    reason: str
    attempts: int
    error: Exception | None = None


def reason_of(exc: BaseException, limit: int = 500) -> str:
    """`ErrorType: message` of the root error, on one line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_resilient(
    batch: Sequence[T],
    fn: Callable[[list[T]], R],
    on_done: Callable[[list[T], R], None],
    on_failed: Callable[[Failed[T]], None],
    *,
    retries: int,
    backoff_s: float,
    what: str = "batch",
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """fn(batch) -> on_done(batch, result); on errors: retry `retries` times (delays backoff_s, 2x, 4x...),
    then split in halves, each half tried once and split again, down to single units -> on_failed."""
    log = get_logger()

    def attempt(units: list[T], tries: int, depth: int) -> None:
        """`depth` = earlier calls that included these units (one per split level)."""
        last: BaseException | None = None
        made = 0
        for i in range(tries):
            made += 1
            try:
                result = fn(units)
            except Exception as exc:  # anything a model call raises: judged below, never swallowed
                kinds = _kinds(exc)
                if kinds & FATAL:
                    raise
                last = exc
                if i + 1 < tries and not kinds & PERMANENT:
                    delay = backoff_s * 2**i
                    log.warning(
                        "enrich: %s of %d failed (%s); retry %d/%d in %.1f s",
                        what,
                        len(units),
                        reason_of(exc, 200),
                        i + 1,
                        tries - 1,
                        delay,
                    )
                    sleep(delay)
                    continue
                break
            on_done(units, result)
            return
        assert last is not None
        if len(units) == 1:
            on_failed(
                Failed(units[0], reason_of(last), made + depth, last if isinstance(last, Exception) else None)
            )
            return
        mid = len(units) // 2
        log.warning("enrich: %s of %d still fails (%s); splitting", what, len(units), reason_of(last, 200))
        attempt(units[:mid], 1, depth + made)
        attempt(units[mid:], 1, depth + made)

    if batch:
        attempt(list(batch), retries + 1, 0)
