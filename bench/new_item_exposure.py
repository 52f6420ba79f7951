"""New items against their exposure: `train.text_prior_new_items` on a trained cold-start run.

    python bench/new_item_exposure.py --workspace WS --run WS/runs/RUN_ID [--values 1,1.1,1.25,1.5]
                                      [--weight W] [--untrained]

The run must have been trained with `cold_start.new_items` (bench/train.py --cold-start) and
`text_prior`. For each value c the saved model scores with the prior's weight on items without training
interactions set to c * w (the setting's own code path: `LLM4CDSR.serving_rows`), and the whole test
split is ranked by `models.evaluate.evaluate` (full ranking, earlier items left out), then read for the
new-item targets, the warm targets, everyone and each domain (and sampled NDCG@10 for everyone): a
boost for new items also lifts them above warm targets, so the three move together. Each row also has
the new items' exposure: their share of the top-10 lists (`new_item_share@10`: items without training
interactions), to read against their share among the test targets (`new_item_targets_share`), and the
new-item targets ranked among the held-out items only (`among_new_items`, `models.evaluate.rank_among`:
the item cold-start protocol, their order apart from their exposure). The run itself scored with its own c (fixed, 1.25 by default, or
chosen on validation with `train.text_prior_new_items: validation`); this bench shows the trade on the
test split's held-out new items around it, at the run's prior weight w or at `--weight` (docs/train.md,
"New items against their exposure"). With --untrained it also ranks with the same model untrained
(`untrained_prior_fit`: built from the run's seed, its (w, c) fitted on validation), the reference of
issue #28's goal that new items rank no worse than untrained, and what `text_prior_new_items_guard`
compares with on validation (docs/train.md, "New items never below the untrained model").
Prints a table and writes bench/results/new_item_exposure_<run id>[_w_W].json; rows that file already
holds at other values of c are kept (each row's `seconds` is from the call that measured it).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from saved_run import SavedRun, open_run, run_arguments, write_merged

from bridgerec.models.coldstart import subset_split
from bridgerec.models.data import EvalSplit
from bridgerec.models.evaluate import Popularity, beyond_accuracy, evaluate, popularity_tables, rank_among
from bridgerec.models.metrics import ndcg
from bridgerec.runtime.machine import machine_info
from bridgerec.tasks.train.stage import untrained_prior_fit

REPO = Path(__file__).resolve().parents[1]


def figures(run: SavedRun, test: EvalSplit, new: np.ndarray, tables: Popularity) -> dict[str, float]:
    """The run's model as it is set, on the test split: full-ranking NDCG@10 overall, on the new-item
    targets (`new`: [U] bool), the warm ones and per domain, sampled NDCG@10, the new items' share of
    the top-10 lists and the new-item targets ranked among the held-out items."""
    model, catalog, settings = run.model, run.catalog, run.settings
    assert run.inputs.cold_eval.held is not None
    ranks = evaluate(model, test, settings.eval_batch_size, True)
    full, top, domain = ranks.full, ranks.top, test.target_domain.numpy()
    assert full is not None and top is not None
    held = torch.from_numpy(run.inputs.cold_eval.held.held)
    among = rank_among(model, subset_split(test, new, "test_new_items"), held, settings.eval_batch_size)
    row = {"overall": ndcg(full, 10), "new_items": ndcg(full[new], 10), "warm_items": ndcg(full[~new], 10)}
    row |= {"new_item_share@10": beyond_accuracy(top, domain, catalog, tables)["new_item_share@10"]}
    row |= {"among_new_items": ndcg(among, 10)}
    row |= {f"new_items_{d}": ndcg(full[new & (domain == i)], 10) for i, d in enumerate(catalog.domains)}
    row |= {f"overall_{d}": ndcg(full[domain == i], 10) for i, d in enumerate(catalog.domains)}
    return row | {"sampled": ndcg(ranks.sampled, 10)}  # sampled NDCG@10 (the split's 100 negatives)


def main() -> None:
    ap = run_arguments(__doc__)
    ap.add_argument("--values", default="1,1.1,1.25,1.5", help="values of text_prior_new_items to rank with")
    ap.add_argument(
        "--untrained",
        action="store_true",
        help="also rank with the same model untrained, its prior fitted on validation (issue #28's reference)",
    )
    ap.add_argument(
        "--weight",
        type=float,
        default=None,
        help="the prior's weight w to rank with (default: the run's own)",
    )
    args = ap.parse_args()
    run = open_run(args.workspace, args.run, args.threads)
    model, config, catalog, settings, inputs = run.model, run.config, run.catalog, run.settings, run.inputs
    if not (settings.cold_start.new_items and getattr(model, "prior_dims", 0)):
        raise SystemExit(
            "error: the run needs cold_start.new_items and text_prior (bench/train.py --cold-start)"
        )
    test = run.split("test")
    assert inputs.cold_eval.held is not None
    new = inputs.cold_eval.held.held[test.target.numpy()]
    tables = popularity_tables(inputs.data.item_counts("train"), catalog)  # `new`: what the share counts

    w = float(model.text_prior_weight) if args.weight is None else args.weight
    fitted = float(model.text_prior_new_scale)  # what the run chose (or was set to)
    rows = []
    for c in [float(x) for x in args.values.split(",")]:
        model.set_text_prior(w, c)
        started = time.perf_counter()
        row = {"text_prior_new_items": c} | figures(run, test, new, tables)
        rows.append(row | {"seconds": time.perf_counter() - started})
        print(
            f"c {c:g}: overall {row['overall']:.4f}, new items {row['new_items']:.4f}, "
            f"warm items {row['warm_items']:.4f}, new items' share of the top 10 {row['new_item_share@10']:.1%}, "
            f"new items among new items {row['among_new_items']:.4f} ({rows[-1]['seconds']:.0f} s)",
            flush=True,
        )
    untrained = None
    if args.untrained:  # the reference of issue #28's goal, as `text_prior_new_items_guard` builds it
        started = time.perf_counter()
        fresh, ref = untrained_prior_fit(settings, model, inputs, run.split("valid"), "cpu")
        untrained = {"w": ref.weight, "c": ref.new_items} | figures(
            replace(run, model=fresh), test, new, tables
        )
        untrained["seconds"] = time.perf_counter() - started
        print(
            f"untrained ({ref.weight:g}, {ref.new_items:g}): overall {untrained['overall']:.4f}, new items "
            f"{untrained['new_items']:.4f}, warm items {untrained['warm_items']:.4f}, new items' share of the "
            f"top 10 {untrained['new_item_share@10']:.1%}, among new items {untrained['among_new_items']:.4f}",
            flush=True,
        )
    print(f"new items are {new.mean():.1%} of the test targets")
    print(
        "| text_prior_new_items | overall | new items | warm items | new_item_share@10 | among new items |\n"
        "|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['text_prior_new_items']:g} | {r['overall']:.4f} | {r['new_items']:.4f} | "
            f"{r['warm_items']:.4f} | {r['new_item_share@10']:.4f} | {r['among_new_items']:.4f} |"
        )
    suffix = "" if args.weight is None else f"_w_{w:g}"
    out = REPO / "bench" / "results" / f"new_item_exposure_{config['run_id']}{suffix}.json"
    record = {
        "run": str(args.run),
        "seed": settings.seed,
        "text_prior_weight": w,
        "text_prior_new_items_of_the_run": fitted,
        "test_users": len(new),
        "new_item_targets": int(new.sum()),
        "new_item_targets_share": float(new.mean()),
        "machine": machine_info(),
        "rows": rows,
    }
    if untrained is not None:
        record["untrained"] = untrained
    write_merged(out, record, "text_prior_new_items")  # earlier rows at other values of c kept


if __name__ == "__main__":
    main()
