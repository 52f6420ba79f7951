"""Hierarchical LLM user profiles (llm4cdsr.md): K-means over the item embeddings; each user's training
prefix split by cluster; per non-empty cluster an analyzer call over its most recent titles; one
summarizer call over the cluster summaries; the profile text embedded with the item embedding model.

Incremental by history hash: a user is generated again only when the titles per cluster that go into
the prompts changed, or the models, prompts or sampling settings did (the generation key).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bridgerec.runtime.logs import get_logger
from bridgerec.runtime.progress import BatchCredit, progress_bar
from bridgerec.storage import schemas
from bridgerec.storage.files import atomic_path
from bridgerec.storage.workspace import hash_json
from bridgerec.tasks.enrich.batching import Failed, run_resilient
from bridgerec.tasks.enrich.engine import Embedder, Generator, OnProgress, Sampling
from bridgerec.tasks.enrich.items import ItemResult
from bridgerec.tasks.enrich.outputs import fixed_list, to_matrix
from bridgerec.tasks.enrich.plan import EnrichContext
from bridgerec.tasks.enrich.settings import ProfileSettings
from bridgerec.tasks.enrich.texts import clean_field

# -- prompts ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str

    def messages(self, **values: str | int) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        return [*out, {"role": "user", "content": self.user.format(**values)}]


@dataclass(frozen=True)
class Prompts:
    version: str
    analyzer: Prompt
    summarizer: Prompt
    digest: str  # of both files' text: editing a prompt in place still invalidates its profiles


def _parse_prompt(text: str, name: str) -> Prompt:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        header = line.strip().lower()
        if header in ("[system]", "[user]"):
            current = header[1:-1]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    if "user" not in sections:
        raise ValueError(f"prompt file {name} has no [user] section")
    return Prompt("\n".join(sections.get("system", [])).strip(), "\n".join(sections["user"]).strip())


def load_prompts(version: str) -> Prompts:
    """tasks/enrich/prompts/profile_analyzer.<version>.txt and profile_summarizer.<version>.txt."""
    folder = resources.files("bridgerec.tasks.enrich") / "prompts"
    texts = {}
    for role in ("analyzer", "summarizer"):
        path = folder / f"profile_{role}.{version}.txt"
        if not path.is_file():
            available = sorted(p.name for p in folder.iterdir() if p.name.startswith("profile_"))
            raise FileNotFoundError(f"prompt version {version!r}: {path} missing (have {available})")
        texts[role] = path.read_text()
    digest = hashlib.blake2b(
        (texts["analyzer"] + "\0" + texts["summarizer"]).encode(), digest_size=8
    ).hexdigest()
    return Prompts(
        version,
        _parse_prompt(texts["analyzer"], f"profile_analyzer.{version}.txt"),
        _parse_prompt(texts["summarizer"], f"profile_summarizer.{version}.txt"),
        digest,
    )


# -- validation of generated text -------------------------------------------------------------------------

_ARTEFACTS = re.compile(r"<\|[^|<>]{0,40}\|>|</?s>|\[/?INST\]|</?(?:assistant|user|system)>", re.IGNORECASE)
_ROLE_PREFIX = re.compile(r"^\s*(?:assistant|user|system)\s*(?::|\n)\s*", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
# The end of a sentence: ".", "!" or "?", a closing quote or bracket may follow, then a space or the end.
_SENTENCE_END = re.compile(r"""[.!?]["')\]]?(?=\s|$)""")


def clean_generated(text: str, max_words: int) -> tuple[str | None, str | None]:
    """(clean text, None) or (None, reason): chat artefacts and role labels stripped, whitespace collapsed,
    cut to `max_words` words and then to its last whole sentence where it ends mid-sentence (the word cap
    or the engine's token limit cut it); without a whole sentence to keep it ends in "…", so that a
    reader sees it was cut ("... and a desire for a…"); text without a letter is rejected."""
    out = _ARTEFACTS.sub(" ", text)
    while (m := _ROLE_PREFIX.match(out)) is not None:
        out = out[m.end() :]
    out = _SPACE.sub(" ", out).strip().strip('"').strip()
    if not re.search(r"[A-Za-z]", out):
        return None, f"empty output after cleaning (raw: {text[:80]!r})"
    words = out.split(" ")
    if len(words) > max_words:
        out = " ".join(words[:max_words])
    if not _SENTENCE_END.search(out[-2:]):  # ends mid-sentence: keep the sentences that are whole
        ends = [m.end() for m in _SENTENCE_END.finditer(out)]
        out = out[: ends[-1]] if ends else out.rstrip(" ,;:-") + "…"
    return out, None


# -- clusters and histories -------------------------------------------------------------------------------


@dataclass
class Clusters:
    assign: np.ndarray  # [n_items] int, -1 for items without a vector
    centroids: np.ndarray  # [K, D] float32
    meta: dict
    refit: bool


def cluster_items(ctx: EnrichContext, item_result: ItemResult) -> Clusters:
    """Spherical K-means (faiss) over the raw item vectors, each item assigned to its nearest centroid by
    inner product. Centroids of the previous build are reused while the model and the K-means settings are
    the same, so new items do not reshuffle every user's clusters (and with them every profile)."""
    import faiss

    enrich = ctx.enrich
    x = np.ascontiguousarray(item_result.vectors[item_result.ok], np.float32)  # [n_ok, D], unit norm
    k = max(1, min(enrich.kmeans_k, len(x)))
    meta = {
        "model_id": ctx.plan.embed_id,
        "k": k,
        "iters": enrich.kmeans_iters,
        "seed": enrich.kmeans_seed,
        "dim": item_result.dim,
    }
    previous = ctx.outputs.kmeans()
    refit = previous is None or previous.get("meta") != meta
    if refit:
        km = faiss.Kmeans(
            item_result.dim, k, niter=enrich.kmeans_iters, seed=enrich.kmeans_seed, spherical=True
        )
        km.train(x)
        assert km.centroids is not None
        centroids = km.centroids.astype(np.float32)  # [K, D], unit norm
    else:
        assert previous is not None
        centroids = previous["centroids"]
    assign = np.full(len(item_result.ok), -1, np.int64)
    if len(x):
        index = faiss.IndexFlatIP(item_result.dim)
        index.add(np.ascontiguousarray(centroids, np.float32))
        _, nearest = index.search(x, 1)  # [n_ok, 1]
        assign[item_result.ok] = nearest[:, 0]
    return Clusters(assign, centroids, meta, refit)


@dataclass(frozen=True)
class UserJob:
    user_id: str
    user_idx: int
    groups: tuple[tuple[int, tuple[str, ...]], ...]  # (cluster, most recent titles, oldest first)
    history_hash: str


def user_jobs(
    sequences: pa.Table, items: pa.Table, clusters: np.ndarray, settings: ProfileSettings
) -> tuple[list[UserJob], int]:
    """The selected users' cluster groups from their *training prefix* (sequence minus the validation and
    test targets). Returns (jobs, number of users in the ingest)."""
    seqs = sequences.select(["user_id", "user_idx", "global_ids"]).sort_by("user_idx")
    n_users = seqs.num_rows
    if settings.max_users is not None:
        seqs = selected_users(seqs, settings.max_users, settings.select)
    # global_id -> row of `items`
    gids = items["global_id"].to_numpy()
    row_of = np.zeros(int(gids.max()) + 1 if len(gids) else 1, np.int64)
    row_of[gids] = np.arange(len(gids))
    titles = [clean_field(t, settings.title_chars, "unknown") for t in items["title"].to_pylist()]
    jobs = []
    for user_id, user_idx, seq in zip(
        seqs["user_id"].to_pylist(), seqs["user_idx"].to_pylist(), seqs["global_ids"].to_pylist(), strict=True
    ):
        rows = row_of[np.asarray(seq[:-2], np.int64)]
        by_cluster: dict[int, list[str]] = {}
        for r in rows:
            by_cluster.setdefault(int(clusters[r]), []).append(titles[r])
        groups = tuple((c, tuple(ts[-settings.titles_per_cluster :])) for c, ts in sorted(by_cluster.items()))
        jobs.append(UserJob(user_id, int(user_idx), groups, hash_json([[c, list(t)] for c, t in groups])))
    return jobs, n_users


def selected_users(seqs: pa.Table, n: int, select: str) -> pa.Table:
    """The `n` users `profiles.max_users` keeps of `seqs` (sorted by user_idx; column global_ids), in
    user_idx order: the first n (`select` first), or the n with the shortest histories (shortest: ties
    by user_idx; a history's training prefix is its length minus the two held-out targets, so the order
    is the same)."""
    if select == "first":
        return seqs.slice(0, n)
    lengths = pc.list_value_length(seqs["global_ids"]).to_numpy(zero_copy_only=False)
    return seqs.take(np.sort(np.argsort(lengths, kind="stable")[:n]))


def generation_key(settings: ProfileSettings, prompts: Prompts, llm_id: str, embed_id: str) -> str:
    """Everything besides the history that shapes a profile: a change regenerates every profile."""
    return hash_json(
        {
            "llm": llm_id,
            "embed": embed_id,
            "prompts": prompts.digest,
            "version": prompts.version,
            **settings.model_dump(
                mode="json",
                include={
                    "temperature",
                    "top_p",
                    "seed",
                    "analyzer_max_tokens",
                    "summarizer_max_tokens",
                    "analyzer_max_words",
                    "profile_max_words",
                    "summarize_single_cluster",
                },
            ),
        }
    )


def _seed(base: int, *parts: object) -> int:
    """A per-request seed from the user and the call: sampled text does not depend on batch makeup."""
    blob = ":".join(str(p) for p in (base, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=4).digest(), "little") & 0x7FFFFFFF


def estimate_cost(
    jobs: list[UserJob], settings: ProfileSettings, tokens_per_s: float, cap_fill: float | None = None
) -> dict:
    """Calls and tokens of generating `jobs`, and minutes at `tokens_per_s` new tokens a second.

    `max_new_tokens` and `minutes` are an upper bound: every call writes up to its cap
    (`analyzer_max_tokens`, `summarizer_max_tokens`). With `cap_fill`, the share of those caps an
    earlier run of the same model and prompts wrote (`generation_cap_fill` in its stats), it adds
    `expected_new_tokens` and `expected_minutes` (on food-kitchen's 3,500 shortest histories the bound
    said 102 min and generation took 56: docs/enrich.md)."""
    analyzer_calls = sum(len(j.groups) for j in jobs)
    summarizer_calls = sum(1 for j in jobs if len(j.groups) > 1 or settings.summarize_single_cluster)
    # ~4 characters a token for English; template and chat boilerplate ~90 tokens a call; a summarizer
    # prompt holds the user's cluster summaries.
    title_chars = sum(len(t) for j in jobs for _, ts in j.groups for t in ts)
    prompt_tokens = (
        title_chars // 4
        + 90 * (analyzer_calls + summarizer_calls)
        + analyzer_calls * settings.analyzer_max_tokens
    )
    new_tokens = (
        analyzer_calls * settings.analyzer_max_tokens + summarizer_calls * settings.summarizer_max_tokens
    )
    return {
        "users": len(jobs),
        "calls": analyzer_calls + summarizer_calls,
        "analyzer_calls": analyzer_calls,
        "summarizer_calls": summarizer_calls,
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": new_tokens,
        "tokens_per_s": round(tokens_per_s, 1),
        "minutes": round(new_tokens / tokens_per_s / 60, 1),
    } | (
        {}
        if cap_fill is None
        else {
            "cap_fill": round(cap_fill, 3),
            "expected_new_tokens": round(new_tokens * cap_fill),
            "expected_minutes": round(new_tokens * cap_fill / tokens_per_s / 60, 1),
        }
    )


# -- generation -------------------------------------------------------------------------------------------


class StepError(Exception):
    """A model call failed in one step of the profile pipeline (the step goes into errors.parquet)."""

    def __init__(self, step: str, exc: Exception) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.step = step


@dataclass
class BatchOut:
    rows: list[dict]
    invalid: list[dict]  # error rows of users whose generated text failed validation
    tokens: int


def generate_batch(
    jobs: list[UserJob],
    settings: ProfileSettings,
    prompts: Prompts,
    generator: Generator,
    embedder: Embedder,
    llm_id: str,
    embed_id: str,
    on_progress: OnProgress | None = None,
) -> BatchOut:
    """All analyzer prompts of the batch in one `generate` call, then all summarizer prompts (users with
    one cluster: none unless `summarize_single_cluster`, their profile is that cluster's summary), then
    one `embed` call over the profile texts. `on_progress(requests, tokens)` follows both calls' requests."""
    summaries, bad, analyzed = _analyze(jobs, settings, prompts, generator, on_progress)
    profiles, summarized = _summarize(jobs, summaries, bad, settings, prompts, generator, on_progress)
    done = sorted(profiles)
    try:
        vectors = (
            embedder.embed([profiles[j] for j in done]) if done else np.zeros((0, embedder.dim), np.float32)
        )
    except Exception as exc:
        raise StepError("embed_profile", exc) from exc
    rows = [
        {
            "user_id": jobs[j].user_id,
            "history_hash": jobs[j].history_hash,
            "cluster_summaries": summaries[j],
            "profile_text": profiles[j],
            "llm_model_id": llm_id,
            "embed_model_id": embed_id,
            "prompt_version": prompts.version,
            "vector": vectors[i],
        }
        for i, j in enumerate(done)
    ]
    invalid = [
        {
            "kind": "profile",
            "key": jobs[j].user_id,
            "step": "analyze" if reason.startswith("analyzer") else "summarize",
            "reason": reason,
            "attempts": 1,
        }
        for j, reason in sorted(bad.items())
    ]
    return BatchOut(rows, invalid, analyzed + summarized)


def _analyze(
    jobs: list[UserJob],
    settings: ProfileSettings,
    prompts: Prompts,
    generator: Generator,
    on_progress: OnProgress | None = None,
) -> tuple[list[list[str]], dict[int, str], int]:
    """One analyzer call per (user, cluster), all in one `generate` call -> (each user's cluster summaries,
    {job index: reason} for users with an invalid summary, new tokens)."""
    analyzer_prompts, analyzer_sampling, owners = [], [], []
    for j, job in enumerate(jobs):
        for cluster, titles in job.groups:
            messages = prompts.analyzer.messages(
                items="\n".join(titles), max_words=settings.analyzer_max_words
            )
            analyzer_prompts.append(generator.render(messages))
            seed = _seed(settings.seed, job.user_id, "a", cluster)
            analyzer_sampling.append(
                Sampling(settings.temperature, settings.top_p, settings.analyzer_max_tokens, seed)
            )
            owners.append(j)
    try:
        outs = generator.generate(analyzer_prompts, analyzer_sampling, on_progress)
    except Exception as exc:
        raise StepError("analyze", exc) from exc
    summaries: list[list[str]] = [[] for _ in jobs]
    bad: dict[int, str] = {}
    tokens = 0
    for j, out in zip(owners, outs, strict=True):
        tokens += out.n_tokens
        text, reason = clean_generated(out.text, settings.analyzer_max_words)
        if text is None:
            bad.setdefault(j, f"analyzer output invalid: {reason}")
        else:
            summaries[j].append(text)
    return summaries, bad, tokens


def _summarizer_calls(job: UserJob, settings: ProfileSettings) -> int:
    """1 when the user's profile needs a summarizer call, 0 when its one cluster summary is the profile."""
    return int(len(job.groups) != 1 or settings.summarize_single_cluster)


def _summarize(
    jobs: list[UserJob],
    summaries: list[list[str]],
    bad: dict[int, str],
    settings: ProfileSettings,
    prompts: Prompts,
    generator: Generator,
    on_progress: OnProgress | None = None,
) -> tuple[dict[int, str], int]:
    """The profile of every user without an invalid summary -> ({job index: profile text}, new tokens);
    an invalid profile adds its reason to `bad`. A user with one cluster summary keeps it as the profile
    (no call) unless `summarize_single_cluster`."""
    good = [j for j in range(len(jobs)) if j not in bad]
    profiles = {j: summaries[j][0] for j in good if not _summarizer_calls(jobs[j], settings)}
    ask = [j for j in good if j not in profiles]
    try:
        outs = (
            generator.generate(
                [
                    generator.render(
                        prompts.summarizer.messages(
                            summaries="\n".join(f"- {s}" for s in summaries[j]),
                            max_words=settings.profile_max_words,
                        )
                    )
                    for j in ask
                ],
                [
                    Sampling(
                        settings.temperature,
                        settings.top_p,
                        settings.summarizer_max_tokens,
                        _seed(settings.seed, jobs[j].user_id, "s"),
                    )
                    for j in ask
                ],
                on_progress,
            )
            if ask
            else []
        )
    except Exception as exc:
        raise StepError("summarize", exc) from exc
    tokens = 0
    for j, out in zip(ask, outs, strict=True):
        tokens += out.n_tokens
        text, reason = clean_generated(out.text, settings.profile_max_words)
        if text is None:
            bad[j] = f"summarizer output invalid: {reason}"
        else:
            profiles[j] = text
    return profiles, tokens


def rows_table(rows: list[dict], dim: int) -> pa.Table:
    schema = schemas.profiles_schema(dim)
    if not rows:
        return schema.empty_table()
    vectors = np.stack([r["vector"] for r in rows]).astype(np.float32)
    columns = {name: [r[name] for r in rows] for name in schema.names if name != "vector"}
    return pa.table({**columns, "vector": fixed_list(vectors)}, schema=schema)


@dataclass
class ProfileResult:
    table: pa.Table  # profiles.parquet
    cache_table: pa.Table  # profile_cache.parquet: these and cached profiles of users outside the cap
    clusters: pa.Table  # item_clusters.parquet
    kmeans_arrays: dict[str, np.ndarray]
    users_selected: int
    generated: int
    cached: int
    tokens_generated: int
    tokens_per_s: float | None
    estimate: dict
    errors: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def _checkpoint_kind(gen_key: str) -> str:
    """Checkpoints of profiles are kept per generation key: a changed key never reads stale ones."""
    return f"profiles-{gen_key}"


@dataclass
class ProfileInputs:
    """What generating any subset of the users needs: clusters, the selected users' jobs, the cache."""

    clusters: Clusters
    # the selected users (all, or profiles.max_users of them: `selected_users`), by user_idx
    jobs: list[UserJob]
    n_users: int  # users in the ingest
    cached: dict[str, dict]  # user_id -> profile row (with its vector) of the same generation key
    gen_key: str
    dim: int
    prompts: Prompts
    # how the cap chose them, for the log: "", " (the first)" or " (the shortest histories)"
    selection: str = ""

    @property
    def checkpoint_kind(self) -> str:
        return _checkpoint_kind(self.gen_key)

    def split(self, jobs: list[UserJob]) -> tuple[list[dict], list[UserJob]]:
        """(cached rows, jobs to generate): a cached profile counts only if the history is unchanged."""
        rows, todo = [], []
        for job in jobs:
            hit = self.cached.get(job.user_id)
            if hit is not None and hit["history_hash"] == job.history_hash:
                rows.append(hit)
            else:
                todo.append(job)
        return rows, todo


def save_clusters(clusters: Clusters, path: Path) -> None:
    """The run's clusters, fixed once for all profile shards (a refit per shard could differ)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            assign=clusters.assign,
            centroids=clusters.centroids,
            meta=np.array(json.dumps(clusters.meta, sort_keys=True)),
            refit=np.array(clusters.refit),
        )


def load_clusters(path: Path) -> Clusters:
    with np.load(path) as npz:
        return Clusters(
            assign=npz["assign"],
            centroids=npz["centroids"].astype(np.float32),
            meta=json.loads(str(npz["meta"])),
            refit=bool(npz["refit"]),
        )


def profile_inputs(ctx: EnrichContext, items: pa.Table, clusters: Clusters, dim: int) -> ProfileInputs:
    """The selected users' jobs over `clusters` (fixed once per run) and the profile cache of `dim`-d
    vectors."""
    settings = ctx.profiles
    sequences = ctx.outputs.ingest.table("sequences")
    jobs, n_users = user_jobs(sequences, items, clusters.assign, settings)
    prompts = load_prompts(settings.prompt_version)
    assert ctx.plan.llm_id is not None
    gen_key = generation_key(settings, prompts, ctx.plan.llm_id, ctx.plan.embed_id)
    # Cache: the previous profiles and profile cache (when made with the same generation key) and this
    # key's checkpoints. The profile cache keeps users outside the current cap, so lowering
    # profiles.max_users (or turning profiles off) and raising it again costs no model call.
    sources = []
    if ctx.previous_stats.get("profile_gen_key") == gen_key:
        sources = [ctx.outputs.previous("profiles"), ctx.outputs.previous("profile_cache")]
    sources.append(ctx.checkpoints.read(_checkpoint_kind(gen_key), schemas.profiles_schema(dim)))
    cached: dict[str, dict] = {}
    for table in sources:
        if table is None or table.num_rows == 0 or table.schema.field("vector").type.list_size != dim:
            continue
        vectors = to_matrix(table["vector"], dim)
        for i, row in enumerate(table.drop_columns(["vector"]).to_pylist()):
            cached[row["user_id"]] = row | {"vector": vectors[i]}
    selection = ""
    if settings.max_users is not None and len(jobs) < n_users:
        selection = " (the shortest histories)" if settings.select == "shortest" else " (the first)"
    return ProfileInputs(clusters, jobs, n_users, cached, gen_key, dim, prompts, selection)


@dataclass
class Generation:
    rows: list[dict]
    errors: list[dict]
    tokens: int
    seconds: float


def generate_profiles(
    ctx: EnrichContext, inputs: ProfileInputs, todo: list[UserJob], label: str = "enrich: user profiles"
) -> Generation:
    """Profiles of `todo` in batches of `profiles.batch_users` (each checkpointed); failures become error
    rows. Starts the engines only when there is something to generate."""
    settings, prompts = ctx.profiles, inputs.prompts
    llm_id, embed_id = str(ctx.plan.llm_id), ctx.plan.embed_id
    out = Generation([], [], 0, 0.0)
    if not todo:
        return out
    gen, emb = ctx.generator(), ctx.embedder()
    started = time.perf_counter()
    with progress_bar(label, total=len(todo), unit="users", counters=("tokens",)) as bar:
        credit = BatchCredit(bar)  # the bar moves call by call, not once per batch

        def run(batch: list[UserJob]) -> BatchOut:
            calls = sum(len(j.groups) + _summarizer_calls(j, settings) for j in batch)
            credit.begin(len(batch) / max(calls, 1))  # users per call
            return generate_batch(batch, settings, prompts, gen, emb, llm_id, embed_id, credit.on_request)

        def done(batch: list[UserJob], result: BatchOut) -> None:
            out.rows.extend(result.rows)
            out.errors.extend(result.invalid)
            out.tokens += result.tokens
            ctx.checkpoints.write(inputs.checkpoint_kind, rows_table(result.rows, inputs.dim))
            credit.settle(len(batch), tokens=result.tokens)

        def fail(f: Failed) -> None:
            step = getattr(f.error, "step", "generate")
            out.errors.append(
                {
                    "kind": "profile",
                    "key": f.unit.user_id,
                    "step": step,
                    "reason": f.reason,
                    "attempts": f.attempts,
                }
            )
            credit.settle(1)

        for start in range(0, len(todo), settings.batch_users):
            run_resilient(
                todo[start : start + settings.batch_users],
                run,
                done,
                fail,
                retries=settings.retries,
                backoff_s=settings.backoff_s,
                what="profile batch",
            )
    out.seconds = time.perf_counter() - started
    get_logger().info(
        "enrich: generated %s profiles in %.1f s (%s tokens, %.0f tokens/s), %d failed",
        f"{len(out.rows):,}",
        out.seconds,
        f"{out.tokens:,}",
        out.tokens / max(out.seconds, 1e-9),
        len(out.errors),
    )
    return out


def log_estimate(inputs: ProfileInputs, n_cached: int, todo: list[UserJob], estimate: dict) -> None:
    """One log line before generating: users, calls, and the time at most (every call at its token cap)
    and, where an earlier run measured how much of the caps it wrote, the time expected."""
    expected = (
        f"; ~{estimate['expected_minutes']:.1f} min expected (the last run wrote "
        f"{estimate['cap_fill']:.0%} of the caps)"
        if "expected_minutes" in estimate
        else ""
    )
    get_logger().info(
        "enrich: profiles for %s of %s users%s (%s cached, %s to generate): ~%s model calls, at most %s "
        "new tokens, at most ~%.1f min at %.0f tokens/s%s",
        f"{len(inputs.jobs):,}",
        f"{inputs.n_users:,}",
        inputs.selection,
        f"{n_cached:,}",
        f"{len(todo):,}",
        f"{estimate['calls']:,}",
        f"{estimate['max_new_tokens']:,}",
        estimate["minutes"],
        estimate["tokens_per_s"],
        expected,
    )


def cap_fill(tokens_generated: int, estimate: dict) -> float | None:
    """The share of the token caps a generation wrote: its new tokens over the estimate's
    `max_new_tokens` for the same users; None where nothing was to generate or nothing was written."""
    cap = estimate.get("max_new_tokens") or 0
    return min(tokens_generated / cap, 1.0) if cap and tokens_generated else None


def build_profiles(
    ctx: EnrichContext,
    inputs: ProfileInputs,
    items: pa.Table,
    failed_before: dict[str, dict],
    estimate: dict,
) -> ProfileResult:
    """Every selected user's profile: cached ones (this run's shards' included) reused, the rest generated.
    Users in `failed_before` (user_id -> error row) failed in this run's shards and are reported, not
    tried again; `estimate` is the plan's cost estimate."""
    rows, todo = inputs.split(inputs.jobs)
    errors = [failed_before[j.user_id] for j in todo if j.user_id in failed_before]
    todo = [j for j in todo if j.user_id not in failed_before]
    n_cached = len(rows)
    gen = generate_profiles(ctx, inputs, todo)
    rows += gen.rows
    errors += gen.errors
    order = {job.user_id: job.user_idx for job in inputs.jobs}
    rows.sort(key=lambda r: order[r["user_id"]])
    in_ingest = set(ctx.outputs.ingest.table("users", columns=["user_id"])["user_id"].to_pylist())
    kept = [r for u, r in sorted(inputs.cached.items()) if u not in order and u in in_ingest]
    tokens_per_s = round(gen.tokens / gen.seconds, 1) if gen.tokens and gen.seconds else None
    clusters = inputs.clusters
    cluster_table = pa.table(
        {"item_id": items["item_id"], "cluster": pa.array(clusters.assign.astype(np.int16), pa.int16())}
    )
    dim = inputs.dim
    return ProfileResult(
        table=rows_table(rows, dim),
        cache_table=rows_table(rows + kept, dim),
        clusters=cluster_table,
        kmeans_arrays={
            "centroids": clusters.centroids,
            "meta": np.array(json.dumps(clusters.meta, sort_keys=True)),
        },
        users_selected=len(inputs.jobs),
        generated=len(gen.rows),
        cached=n_cached,
        tokens_generated=gen.tokens,
        tokens_per_s=tokens_per_s,
        estimate=estimate,
        errors=errors,
        stats={
            "profile_gen_key": inputs.gen_key,
            "kmeans_refit": clusters.refit,
            "kmeans_k": int(clusters.centroids.shape[0]),
            # the speed the next run's estimate uses
            "generation_tokens_per_s": tokens_per_s or ctx.previous_stats.get("generation_tokens_per_s"),
        },
    )
