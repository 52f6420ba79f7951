"""Which CPU cores an engine binds to, so that engines on one machine do not share cores.

vLLM's CPU backend pins an engine's threads to the cores in `VLLM_CPU_OMP_THREADS_BIND`. Two engines
started with the same list (two `runtime.runner: processes` workers, two Ray shard tasks on one node,
two nights on one host) run on the same cores while the others idle: measured on a 2-core VM, two
1-thread engines both bound to core 0 embedded 138 texts/s together, and 212 texts/s bound to cores 0
and 1 (docs/enrich.md, "One engine per core").

`claim_cores(n)` takes `n` of the cores this process may run on (`os.sched_getaffinity`, which honours
taskset, cgroup cpusets and Ray's placement) that no other claim on the machine holds: one lock file
per core, held with `flock` for as long as the claim (the OS drops the locks when the process ends, so a
killed worker leaves no stale claim). When fewer than `n` are free the claim shares (`shared`): sharers
take turns round the cores it may use (a turn counter in the same folder), so two workers that find every
core held still land on different cores where there are enough.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


def lock_dir() -> Path:
    """Where the per-core lock files live: one folder per user in the system's temp folder (the
    claims of one user's processes on one machine see each other)."""
    return Path(tempfile.gettempdir()) / f"bridgerec-cores-{os.getuid()}"


def allowed_cores() -> list[int]:
    """The cores this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def cpu_list(cores: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the form `VLLM_CPU_OMP_THREADS_BIND` and taskset read)."""
    parts: list[str] = []
    start = prev = None
    for c in sorted(cores):
        if prev is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
        start = prev = c
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(parts)


@dataclass
class CoreClaim:
    """`cores` held for this process (`shared`: they were not all free, so other engines may be bound to
    them too). `release()` gives them back; a claim is also released when its process ends."""

    cores: list[int]
    shared: bool
    _files: list[int] = field(default_factory=list, repr=False)

    @property
    def bind(self) -> str:
        return cpu_list(self.cores)

    def release(self) -> None:
        for fd in self._files:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor drops its flock
        self._files.clear()


def claim_cores(n: int, directory: Path | None = None) -> CoreClaim:
    """`n` cores (at most as many as this process may use) that no other claim on the machine holds,
    the lowest free ones first; when fewer are free, `n` of them shared, at the next turn round them."""
    allowed = allowed_cores()
    n = max(1, min(n, len(allowed)))
    folder = directory or lock_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # no lock folder: share, as engines did before claims existed
        return CoreClaim(allowed[:n], shared=True)
    taken: list[int] = []
    files: list[int] = []
    for core in allowed:
        if len(taken) == n:
            break
        try:
            fd = os.open(folder / f"core-{core}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another claim holds this core
            os.close(fd)
            continue
        taken.append(core)
        files.append(fd)
    if len(taken) == n:
        return CoreClaim(taken, shared=False, _files=files)
    CoreClaim(taken, shared=False, _files=files).release()
    offset = _next_turn(folder) * n
    return CoreClaim(sorted(allowed[(offset + i) % len(allowed)] for i in range(n)), shared=True)


def _next_turn(folder: Path) -> int:
    """0, 1, 2, ... across the processes of the machine (a counter file under an exclusive flock)."""
    try:
        fd = os.open(folder / "turn", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 32, 0).strip()
        turn = int(raw) if raw.isdigit() else 0
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(turn + 1).encode(), 0)
        return turn
    finally:
        os.close(fd)
