"""Engines on one machine get cores of their own (bridgerec/runtime/cores.py), and a stage's shards are cut
and threaded for the workers that run them at once (`Runner.slots`, `Runner.shard_threads`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bridgerec.runtime.cores import allowed_cores, claim_cores, cpu_list
from bridgerec.runtime.runner import InProcess
from bridgerec.tasks.enrich.plan import shards

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bridgerec.runtime.cores import claim_cores
    claim = claim_cores(int(sys.argv[1]), Path(sys.argv[2]))
    print(claim.bind, claim.shared, flush=True)
    time.sleep(600)
    """
)

needs_two = pytest.mark.skipif(len(allowed_cores()) < 2, reason="needs 2 cores this process may use")


def hold(n: int, folder: Path) -> tuple[subprocess.Popen[str], str, bool]:
    """A process that claims `n` cores in `folder` and keeps them until killed: (process, bind, shared)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(n), str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    bind, shared = proc.stdout.readline().split()
    return proc, bind, shared == "True"


def test_cpu_list_is_the_form_vllm_reads() -> None:
    assert cpu_list([0]) == "0"
    assert cpu_list([0, 1, 2, 5]) == "0-2,5"
    assert cpu_list([7, 3, 4]) == "3-4,7"


@needs_two
def test_a_second_process_gets_other_cores(tmp_path: Path) -> None:
    first, bind, shared = hold(1, tmp_path)
    try:
        mine = claim_cores(1, tmp_path)
        assert not shared and not mine.shared
        assert mine.bind != bind  # the other process holds its core: this claim takes the next one
        mine.release()
        again = claim_cores(1, tmp_path)
        assert again.cores == mine.cores  # released: the lowest free core again
        again.release()
    finally:
        first.kill()
        first.wait()


@needs_two
def test_a_killed_holder_leaves_no_stale_claim(tmp_path: Path) -> None:
    everything = len(allowed_cores())
    holder, bind, _ = hold(everything, tmp_path)
    assert claim_cores(1, tmp_path).shared  # every core held
    holder.kill()
    holder.wait()  # the OS drops a dead process's flocks
    claim = claim_cores(everything, tmp_path)
    assert not claim.shared and claim.bind == bind
    claim.release()


@needs_two
def test_sharers_take_turns_round_the_cores(tmp_path: Path) -> None:
    """With every core held, two more 1-core claims still land on different cores."""
    holder, _, _ = hold(len(allowed_cores()), tmp_path)
    try:
        a, b = claim_cores(1, tmp_path), claim_cores(1, tmp_path)
        assert a.shared and b.shared
        assert a.cores != b.cores
    finally:
        holder.kill()
        holder.wait()


def test_a_claim_never_asks_for_more_cores_than_allowed(tmp_path: Path) -> None:
    claim = claim_cores(10_000, tmp_path)
    assert claim.cores == allowed_cores() and not claim.shared
    claim.release()
    assert claim_cores(0, tmp_path).cores == allowed_cores()[:1]


def test_shards_are_cut_so_every_slot_gets_work() -> None:
    assert [(s.start, s.stop) for s in shards(70, 40)] == [(0, 40), (40, 70)]
    assert [(s.start, s.stop) for s in shards(70, 40, slots=2)] == [(0, 35), (35, 70)]
    assert [(s.start, s.stop) for s in shards(9, 5, slots=4)] == [(0, 3), (3, 6), (6, 9)]
    assert [(s.start, s.stop) for s in shards(100_000, 16_384, slots=2)][-1] == (98_304, 100_000)
    assert shards(0, 40, slots=2) == []


def test_shard_threads_divide_the_run_among_the_slots() -> None:
    from bridgerec.config import RaySettings, RuntimeSettings
    from bridgerec.flows.stage import TaskRuns, task_runner
    from bridgerec.stages import STAGE

    assert InProcess().shard_threads(8) == 8
    _, processes = task_runner(STAGE["enrich"], RuntimeSettings(runner="processes", workers=3))
    assert (processes.slots, processes.shard_threads(8), processes.shard_threads(2)) == (3, 2, 1)
    ray = RaySettings.model_validate({"resources": {"enrich": {"num_cpus": 4}}})
    _, on_ray = task_runner(STAGE["enrich"], RuntimeSettings(runner="ray", ray=ray))
    assert isinstance(on_ray, TaskRuns) and on_ray.shard_threads(64) == 4  # what its Ray task reserves
