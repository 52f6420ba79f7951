"""New items' ID rows from their text neighbours (`train.id_text_knn`) on a saved cold-start run.

    python bench/id_text_knn.py --workspace WS --run WS/runs/RUN_ID [--values 0,10,20]

The run must have been trained with `cold_start.new_items` (bench/train.py --cold-start), `id_text_fit`
and `text_prior`. For each k the saved model scores the items without training interactions with the
mean ID row of their k text-nearest items with them (`LLM4CDSR.set_id_text_knn`; 0 = the ridge map the
same weights carry), then does what the train stage does after training: (w, c) fitted on validation
(`fit_text_prior`: the run's grid of w, today's default grid of c), and the test split ranked (`bench/new_item_exposure.py`'s figures:
overall, new-item and warm targets, new items' share of the top 10, new items among new items, sampled).
Training never uses the k-NN rows (`Recommender.set_serving`: the ridge map scores new items while
the epochs run), so the same weights scored with another k are what a run trained with that k gives.
Prints a table and writes bench/results/id_text_knn_<run id>.json (rows at other values of k that the
file already holds are kept; ranks do not depend on the machine).
"""

from __future__ import annotations

import time
from pathlib import Path

from new_item_exposure import figures
from saved_run import open_run, run_arguments, write_merged

from bridgerec.models.evaluate import fit_text_prior, popularity_tables
from bridgerec.models.llm4cdsr import LLM4CDSR
from bridgerec.runtime.machine import machine_info
from bridgerec.tasks.train.settings import MIN_NEW_TARGETS, TrainSettings

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = run_arguments(__doc__)
    ap.add_argument("--values", default="0,10,20", help="values of k (0: the ridge map)")
    args = ap.parse_args()
    run = open_run(
        args.workspace, args.run, args.threads, weights="selected"
    )  # (w, c) refitted on validation
    model, settings, inputs = run.model, run.settings, run.inputs
    if not (isinstance(model, LLM4CDSR) and model.prior_dims and settings.cold_start.new_items):
        raise SystemExit("error: the run needs LLM4CDSR with text_prior and cold_start.new_items")
    valid = run.split("valid")
    test = run.split("test")
    assert inputs.cold_eval.held is not None
    new = inputs.cold_eval.held.held[test.target.numpy()]
    tables = popularity_tables(inputs.data.item_counts("train"), run.catalog)
    rows = []
    for k in [int(x) for x in args.values.split(",")]:
        started = time.perf_counter()
        model.set_id_text_knn(k)
        if k:
            model.fit_knn()
        refit = time.perf_counter() - started
        fit = fit_text_prior(
            model, valid, settings.text_prior_grid, settings.eval_batch_size, "cpu",
            new_items_grid=TrainSettings().text_prior_new_items_grid, min_new_targets=MIN_NEW_TARGETS,
        )  # fmt: skip
        pair = (fit.weight, fit.new_items)
        row = {"k": k, "w": fit.weight, "c": fit.new_items, "valid": fit.ndcg10[pair]}
        row |= {"valid_new_items": fit.ndcg10_new[pair], "knn_fit_seconds": refit}
        row |= figures(run, test, new, tables) | {"seconds": time.perf_counter() - started}
        rows.append(row)
        print(
            f"k {k}: ({fit.weight:g}, {fit.new_items:g}), validation {row['valid']:.5f}, test {row['overall']:.5f}, "
            f"new items {row['new_items']:.4f}, warm {row['warm_items']:.4f} ({row['seconds']:.0f} s)",
            flush=True,
        )
    print(
        "| k | (w, c) | valid | test | new items | warm items | new_item_share@10 | among new items | sampled |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['k']} | ({r['w']:g}, {r['c']:g}) | {r['valid']:.5f} | {r['overall']:.5f} | {r['new_items']:.4f} "
            f"| {r['warm_items']:.4f} | {r['new_item_share@10']:.4f} | {r['among_new_items']:.4f} | {r['sampled']:.4f} |"
        )
    out = REPO / "bench" / "results" / f"id_text_knn_{run.config['run_id']}.json"
    record = {"run": str(args.run), "seed": settings.seed, "test_users": len(new)}
    record |= {"new_item_targets": int(new.sum()), "machine": machine_info(), "rows": rows}
    write_merged(out, record, "k")


if __name__ == "__main__":
    main()
