"""Profiles as a user feature: the LLM's profile of a user mixed into the text prior's history text, on a
trained run, for the users who have one (issue #28, "profiles that earn their time").

    python bench/profile_prior.py --workspace WS --run WS/runs/RUN_ID --profiles PROFILE_WS
                                  [--mix 0,0.25,0.5,1,2,inf] [--decay 0.5]
                                  [--baseline WS0/runs/RUN0 --baseline-workspace WS0]

PROFILE_WS is a workspace on the same ingest whose enrich stage wrote profiles (e.g. `profiles.max_users:
1000` with `profiles.select: shortest`: the users with the shortest histories, where a profile should
matter most). The run must have `text_prior`. The prior scores an item by w * cos(q, item text) with q
the user's recency-weighted history text (`LLM4CDSR.prior_users`); here, for a user with a profile
vector p (the profile text embedded by the item embedding model, so in the same space),

    q(m) = normalize(q + m * normalize(p))      (m = inf: the profile alone, q = normalize(p))

for every mix m, all other scores as served. The profile is written from the user's training prefix
(the sequence without its validation and test targets: `tasks/enrich/profiles.user_jobs`), so it holds
neither target. w is fitted as training fits it (`models.evaluate.fit_text_prior` on full-ranking
validation with the selected weights, c kept at the run's), then the profiled users are ranked over
their whole target domain (earlier items left out, `models.evaluate.rank_over_domain`) on validation (selected
weights) and test (served weights). m is chosen on the profiled users' validation (ties: the smaller).
Users of a `--cold-start` run whose history lost a held-out item are left out (their profile names an
item their history no longer has). Each test row carries the paired difference from the first row and its
standard error (per-user NDCG@10 differences).

With `--baseline WS/runs/RUN` (a run of the same settings and seed trained without profiles, e.g. in a
workspace without them: `--baseline-workspace`) the baseline's figures on the same users head the table:
the run against it measures the paper's profile term (`train.beta`) on the users who have a profile.

Prints a table and writes bench/results/profile_prior_<run id>.json (ranks of a saved model: they do not
depend on the machine; `machine` says where it ran).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from saved_run import SavedRun, open_run, run_arguments

from bridgerec.models.data import EvalSplit, users_by_domain
from bridgerec.models.evaluate import fit_text_prior, rank_over_domain
from bridgerec.models.metrics import as_numpy, ndcg, ndcg_per_user
from bridgerec.runtime.machine import machine_info
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.enrich import EnrichOutputs
from bridgerec.tasks.ingest import IngestOutputs

REPO = Path(__file__).resolve().parents[1]


def profiled_rows(run: SavedRun, profile_ws: Path) -> tuple[np.ndarray, torch.Tensor, int]:
    """(rows [n] of the run's users with a profile and an untouched history, profiles [U, D] unit-norm by
    row (zero rows elsewhere), users left out because their history lost a held-out item)."""
    ws = Workspace(profile_ws)
    user_idx, vectors = EnrichOutputs(ws).profile_vectors()  # by the ingest's user_idx
    seqs = IngestOutputs(ws).table("sequences", columns=["user_idx", "global_ids"]).sort_by("user_idx")
    lengths = pc.list_value_length(seqs["global_ids"]).to_numpy(zero_copy_only=False)  # [U_ingest]
    held = run.inputs.cold_eval.held
    users = held.users if held is not None else np.arange(len(lengths))  # run row -> ingest user_idx
    run_lengths = run.inputs.sequences.lengths  # [U] the run's histories (held-out items removed)
    by_user = np.full(len(lengths), -1, np.int64)
    by_user[user_idx] = np.arange(len(user_idx))
    which = by_user[users]  # [U] row of `vectors`, -1 without a profile
    has = which >= 0
    intact = run_lengths == lengths[users]
    profiles = np.zeros((len(users), vectors.shape[1]), np.float32)
    profiles[has] = vectors[which[has]]
    rows = np.flatnonzero(has & intact)
    return rows, F.normalize(torch.from_numpy(profiles), dim=-1), int((has & ~intact).sum())


@torch.no_grad()
def full_ranks(
    run: SavedRun, split: EvalSplit, rows: np.ndarray, profiles: torch.Tensor, mix: float
) -> np.ndarray:
    """[n] 0-based full-ranking rank of the target of each user in `rows`, the prior's history text mixed
    with the profile by `mix` (module docstring)."""
    model, bs = run.model, run.settings.eval_batch_size
    model.eval()
    dims, w = model.prior_dims, float(model.text_prior_weight)
    ex_offsets = np.searchsorted(split.exclude_users, np.arange(split.inputs.shape[0] + 1))
    out = np.zeros(split.inputs.shape[0], np.int64)
    assert split.candidates is not None
    subset = torch.zeros(split.inputs.shape[0], dtype=torch.bool)
    subset[torch.from_numpy(rows)] = True
    for d, users in enumerate(users_by_domain(split.target_domain, model.n_domains)):
        users = users[subset[users]]
        if not len(users):
            continue
        items = model.item_vectors(d)  # [n_d + 1, D]
        for chunk in torch.split(users, bs):
            inputs = split.inputs[chunk]
            u = model.user_vectors(inputs, d).clone()  # [B, D], the prior's columns last
            p = profiles[chunk]  # [B, Dg]
            q = p if math.isinf(mix) else F.normalize(model.prior_users(inputs) + mix * p, dim=-1)
            u[:, -dims:] = w * q
            rank, _, _ = rank_over_domain(u, items, split.candidates[chunk, 0], chunk, split, ex_offsets)
            out[chunk.numpy()] = as_numpy(rank)
    return out[rows]


class Opened(NamedTuple):
    selected: SavedRun  # the weights validation chose: validation figures
    served: SavedRun  # the served weights (the refit's where there is one): test figures
    valid: EvalSplit
    test: EvalSplit
    weight: float  # the prior's w, fitted as training fits it


def opened(workspace: Path, run: Path, threads: int, decay: float) -> Opened:
    """The run with both weights, its validation and test splits and the prior's weight fitted at
    `decay` (`models.evaluate.fit_text_prior` on full-ranking validation, c kept at the run's).

    Raises SystemExit when the run has no text prior."""
    selected = open_run(workspace, run, threads, weights="selected")
    served = open_run(workspace, run, threads, weights="served")
    settings = selected.settings
    if not getattr(selected.model, "prior_dims", 0):
        raise SystemExit(f"error: {run} has no text prior (train.text_prior)")
    for r in (selected, served):
        r.model.config = dataclasses.replace(r.model.config, text_prior_decay=decay)
    valid = selected.split("valid")
    test = served.split("test")
    c = float(selected.model.text_prior_new_scale)
    fit = fit_text_prior(selected.model, valid, settings.text_prior_grid, settings.eval_batch_size)
    served.model.set_text_prior(fit.weight, c)
    return Opened(selected, served, valid, test, fit.weight)


def main() -> None:
    ap = run_arguments(__doc__)
    ap.add_argument("--profiles", type=Path, required=True, help="a workspace with profiles (same ingest)")
    ap.add_argument(
        "--mix", default="0,0.25,0.5,1,2,inf", help="weights m of the profile in the history text"
    )
    ap.add_argument("--decay", type=float, default=0.5, help="text_prior_decay (the default's)")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="a run of the same settings and split trained without profiles (WS/runs/RUN_ID): its figures "
        "on the same users head the table, the paired differences are from it (the profile term, beta)",
    )
    ap.add_argument("--baseline-workspace", type=Path, help="the baseline's workspace (default: --workspace)")
    args = ap.parse_args()
    run = opened(args.workspace, args.run, args.threads, args.decay)
    settings, catalog = run.selected.settings, run.selected.catalog
    c = float(run.selected.model.text_prior_new_scale)
    rows, profiles, lost = profiled_rows(run.served, args.profiles)
    domain = run.test.target_domain.numpy()[rows]
    counts = ", ".join(f"{name} {int((domain == i).sum()):,}" for i, name in enumerate(catalog.domains))
    print(
        f"w {run.weight:g} (c {c:g}); {len(rows):,} profiled users ({counts}; {lost} left out: a held-out "
        "item left their history)"
    )
    variants: list[tuple[str, Opened, float]] = []
    if args.baseline is not None:
        base_run = opened(args.baseline_workspace or args.workspace, args.baseline, args.threads, args.decay)
        if not torch.equal(base_run.test.target, run.test.target):
            raise SystemExit(f"error: {args.baseline} is not on the same split as {args.run}")
        variants.append((f"baseline {args.baseline.name}, m = 0", base_run, 0.0))
    variants += [(f"{float(m):g}", run, float(m)) for m in args.mix.split(",")]
    first = None
    out: list[dict[str, Any]] = []
    for name, on, mix in variants:
        started = time.perf_counter()
        v = ndcg_per_user(full_ranks(on.selected, on.valid, rows, profiles, mix), 10)
        ranks = full_ranks(on.served, on.test, rows, profiles, mix)
        t = ndcg_per_user(ranks, 10)
        first = t if first is None else first
        diff = t - first
        row: dict[str, Any] = {
            "mix": name,
            "weight": on.weight,
            "valid": float(v.mean()),
            "test": float(t.mean()),
            "test_diff": float(diff.mean()),
            "test_diff_se": float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0,
        }
        row |= {f"test_{d}": ndcg(ranks[domain == i], 10) for i, d in enumerate(catalog.domains)}
        row["seconds"] = time.perf_counter() - started
        out.append(row)
        print(
            f"{name}: validation {row['valid']:.4f}, test {row['test']:.4f} ({row['seconds']:.0f} s)",
            flush=True,
        )
    ours = [r for r, (_, on, _) in zip(out, variants, strict=True) if on is run]
    best = max(ours, key=lambda r: (r["valid"], -float(r["mix"])))  # ties: the smaller m
    names = " | ".join(f"test {d}" for d in catalog.domains)
    print(f"| m | validation | test | test - first row +- se | {names} |")
    print("|---" * (4 + len(catalog.domains)) + "|")
    for r in out:
        per_domain = " | ".join(f"{r[f'test_{d}']:.4f}" for d in catalog.domains)
        mark = " (chosen)" if r is best else ""
        print(
            f"| {r['mix']}{mark} | {r['valid']:.4f} | {r['test']:.4f} | {r['test_diff']:+.4f} +- "
            f"{r['test_diff_se']:.4f} | {per_domain} |"
        )
    record = {
        "run": str(args.run),
        "baseline": str(args.baseline) if args.baseline else None,
        "seed": settings.seed,
        "profiles": str(args.profiles),
        "users": len(rows),
        "users_by_domain": {d: int((domain == i).sum()) for i, d in enumerate(catalog.domains)},
        "left_out_lost_items": lost,
        "text_prior_decay": args.decay,
        "weight": run.weight,
        "text_prior_new_items": c,
        "chosen_mix": best["mix"],
        "served": "refit" if (args.run / "refit.safetensors").exists() else "selected",
        "machine": machine_info(),
        "rows": out,
    }
    path = REPO / "bench" / "results" / f"profile_prior_{args.run.name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
