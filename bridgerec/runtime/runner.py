"""Where a stage's steps run: the `Runner` a stage receives in its `StageRun`, and the `step` marker that
declares how a step runs as a Prefect task run (its name, run name and retries).

A stage writes its order of work once, calling its steps through `runner.call(step, *args)` and
`runner.map(step, shards, *args)`. `InProcess` runs them here, one after another (the library API and the
tests); the flows' runner (flows/runner.py) runs each call as a Prefect task run, on the task runner that
`runtime.runner` picks (this thread, worker processes), so the UI shows one task run per shard with its own
state, retries and logs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


@dataclass(frozen=True)
class Step:
    """How a stage function runs as a task run: `name` in the UI, `run_name` a template over its
    parameters (e.g. "embed-items-{shard.index}"), retries of a failed run (a step must then be
    idempotent: a retry sees only what finished before)."""

    name: str
    run_name: str | None = None
    retries: int = 0
    retry_delay_s: float = 0.0


def step(
    name: str, *, run_name: str | None = None, retries: int = 0, retry_delay_s: float = 0.0
) -> Callable[[F], F]:
    """Declare a stage function a step (`Step`); the function itself is unchanged."""

    def mark(fn: F) -> F:
        fn.__bridgerec_step__ = Step(name, run_name, retries, retry_delay_s)  # type: ignore[attr-defined]
        return fn

    return mark


def step_of(fn: Callable[..., Any]) -> Step:
    """The `Step` declared on `fn`, or a plain one named after it."""
    declared = getattr(fn, "__bridgerec_step__", None)
    return declared if isinstance(declared, Step) else Step(fn.__name__.replace("_", "-"))


def shard_size(n: int, size: int, slots: int = 1) -> int:
    """Rows of a shard cutting n rows: `size`, or n / `slots` (rounded up) when that is smaller, so that
    `slots` workers running at once each get a shard (at least 1)."""
    return max(1, min(size, -(-n // max(1, slots))))


class Runner:
    """Runs a stage's steps. `call(fn, *args, **kwargs)` is `fn(*args, **kwargs)`; `map(fn, shards, *args)`
    is `[fn(*args, shard) for shard in shards]`, in shard order, wherever they run.

    `slots`: shards that run at once on one machine (a stage cuts at least that many, so every slot gets
    work); `shard_threads(threads)`: the CPU threads one mapped shard may use when the run has `threads`
    (slots on one machine share its cores)."""

    slots: int = 1

    def shard_threads(self, threads: int) -> int:
        return max(1, threads // self.slots)

    def call(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        raise NotImplementedError

    def map(self, fn: Callable[..., R], shards: Sequence[T], *args: Any) -> list[R]:
        raise NotImplementedError


class InProcess(Runner):
    """Every step here, one after another, in this thread."""

    def call(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        return fn(*args, **kwargs)

    def map(self, fn: Callable[..., R], shards: Sequence[T], *args: Any) -> list[R]:
        return [fn(*args, shard) for shard in shards]
