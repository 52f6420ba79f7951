"""The text prior's recency decay (`train.text_prior_decay`) on a trained run, every value side by side.

    python bench/prior_decay.py --workspace WS --run WS/runs/RUN_ID [--decays 1,0.7,0.5,0.35,0.2]

The run must have `text_prior`. For each decay d the history's text vector weighs the item k places
before the latest by d^k (the setting's own code path: `LLM4CDSR.prior_users`); the prior's weight w is
chosen as training chooses it, on full-ranking validation NDCG@10 with the selected weights from the
run's `text_prior_grid` (`models.evaluate.fit_text_prior`, c kept at the run's), and the served weights
(the refit's, where the run has one) are then ranked on the test split at that (d, w) by
`models.evaluate.evaluate` (full ranking, earlier items left out; sampled with the split's 100
negatives): overall, per domain and, for a `--cold-start` run, on its new-item and warm targets. The decay changes no training step, so one trained run measures
every value (docs/train.md, "A recency-weighted history text").
Prints a table and writes bench/results/prior_decay_<run id>.json; rows that file already holds at
other decays are kept (each row's `seconds` is from the call that measured it).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from saved_run import open_run, run_arguments, write_merged

from bridgerec.models.evaluate import evaluate, fit_text_prior
from bridgerec.models.metrics import ndcg
from bridgerec.runtime.machine import machine_info

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = run_arguments(__doc__)
    ap.add_argument("--decays", default="1,0.7,0.5,0.35,0.2", help="values of text_prior_decay to try")
    args = ap.parse_args()
    selected = open_run(args.workspace, args.run, args.threads, weights="selected")
    served = open_run(args.workspace, args.run, args.threads, weights="served")
    settings, catalog = selected.settings, selected.catalog
    if not getattr(selected.model, "prior_dims", 0):
        raise SystemExit("error: the run has no text prior (train.text_prior)")
    bs = settings.eval_batch_size
    valid = selected.split("valid")
    test = served.split("test")
    c = float(selected.model.text_prior_new_scale)
    domain = test.target_domain.numpy()
    held = served.inputs.cold_eval.held  # the items held out as new (train.cold_start.new_items), or None
    new = held.held[test.target.numpy()] if held is not None else None  # [U] the target is a new item
    rows = []
    for decay in [float(x) for x in args.decays.split(",")]:
        started = time.perf_counter()
        for run in (selected, served):  # the decay is a model config value read at inference only
            run.model.config = dataclasses.replace(run.model.config, text_prior_decay=decay)
        fit = fit_text_prior(selected.model, valid, settings.text_prior_grid, bs)
        served.model.set_text_prior(fit.weight, c)
        ranks = evaluate(served.model, test, bs, True)
        assert ranks.full is not None
        row = {"text_prior_decay": decay, "weight": fit.weight, "valid": fit.ndcg10[(fit.weight, c)]}
        row |= {"test": ndcg(ranks.full, 10), "test_sampled": ndcg(ranks.sampled, 10)}
        row |= {f"test_{d}": ndcg(ranks.full[domain == i], 10) for i, d in enumerate(catalog.domains)}
        if new is not None:  # a --cold-start run: its held-out items' test targets apart
            row |= {
                "test_new_items": ndcg(ranks.full[new], 10),
                "test_warm_items": ndcg(ranks.full[~new], 10),
            }
        rows.append(row | {"seconds": time.perf_counter() - started})
        print(
            f"decay {decay:g}: w {fit.weight:g}, validation {row['valid']:.4f}, test {row['test']:.4f} "
            f"({rows[-1]['seconds']:.0f} s)",
            flush=True,
        )
    names = " | ".join(f"test {d}" for d in catalog.domains)
    print(f"| text_prior_decay | w | validation | test | {names} | test sampled |")
    print("|---" * (5 + len(catalog.domains)) + "|")
    for r in rows:
        per_domain = " | ".join(f"{r[f'test_{d}']:.4f}" for d in catalog.domains)
        print(
            f"| {r['text_prior_decay']:g} | {r['weight']:g} | {r['valid']:.4f} | {r['test']:.4f} | "
            f"{per_domain} | {r['test_sampled']:.4f} |"
        )
    record = {
        "run": str(args.run),
        "seed": settings.seed,
        "text_prior_new_items": c,
        "served": "refit" if (args.run / "refit.safetensors").exists() else "selected",
        "machine": machine_info(),
        "rows": rows,
    }
    write_merged(REPO / "bench" / "results" / f"prior_decay_{args.run.name}.json", record, "text_prior_decay")


if __name__ == "__main__":
    main()
