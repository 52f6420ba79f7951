"""The refit (`train.refit`) on a saved run trained without it: test figures of the selected weights and
of the refit, side by side, with the popularity baseline counted both ways.

    python bench/refit.py --workspace WS --run WS/runs/RUN_ID [--threads 2] [--control]

The run's epoch curve (metrics.parquet) gives the path of its best weights (`kept_rates`), and the train
stage's own `tasks.train.refit.refit` trains the fresh model through the validation targets along it and
writes refit.safetensors into the run folder, as the stage would have (from then on the run serves it).
A run trained with `train.refit` on already has one: it is scored as it is (`--retrain` trains it again).
Test split, full ranking (earlier items of the domain left out) and sampled (100 negatives); with
`cold_start.new_items`, also the new-item and warm targets and the new items among the held-out items
(`bench/new_item_exposure.py`'s figures). `--control` also trains the selected weights one more epoch
at the run's last rate on the training prefixes only (no validation targets), to tell the validation
targets' share of the gain from that of more training.
Prints a table and writes bench/results/refit_<run id>.json (ranks do not depend on the machine; the
seconds do, and the JSON records the machine).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from saved_run import SavedRun, open_run, run_arguments

from bridgerec.models.config import ModelConfig
from bridgerec.models.data import EvalSplit
from bridgerec.models.evaluate import evaluate
from bridgerec.models.metrics import ndcg
from bridgerec.models.optim import Optimizer
from bridgerec.models.pop import Popularity
from bridgerec.models.registry import build_model
from bridgerec.models.trainer import FitState, kept_rates, train_epoch
from bridgerec.runtime.machine import machine_info
from bridgerec.storage.runs import RunDir
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.train.refit import refit

REPO = Path(__file__).resolve().parents[1]


def fit_state(run_dir: Path) -> FitState:
    """The run's loop state as far as the refit needs it: each epoch's validation and rate, the best."""
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    by_epoch: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r["users"] is not None or r["group"] != "overall":
            continue
        key = {("valid", "full", "ndcg@10"): "valid_full_ndcg@10", ("valid", "sampled", "ndcg@10"): "valid_ndcg@10",
               ("train", "train", "lr"): "lr"}.get((r["split"], r["protocol"], r["metric"]))  # fmt: skip
        if key:
            by_epoch.setdefault(int(r["epoch"]), {"epoch": int(r["epoch"])})[key] = r["value"]
    summary = json.loads((run_dir / "summary.json").read_text())
    return FitState(history=[by_epoch[e] for e in sorted(by_epoch)], best_epoch=summary["best_epoch"])


def figures(
    run: SavedRun, model: torch.nn.Module, test: EvalSplit, new: np.ndarray | None
) -> dict[str, float]:
    """Test NDCG@10 of `model`: full ranking overall, per domain, new and warm targets; sampled."""
    ranks = evaluate(model, test, run.settings.eval_batch_size, True)
    full, domain = ranks.full, test.target_domain.numpy()
    assert full is not None
    row = {"overall": ndcg(full, 10), "sampled": ndcg(ranks.sampled, 10)}
    row |= {d: ndcg(full[domain == i], 10) for i, d in enumerate(run.catalog.domains)}
    if new is not None:
        row |= {"new_items": ndcg(full[new], 10), "warm_items": ndcg(full[~new], 10)}
    return row


def main() -> None:
    ap = run_arguments(__doc__)
    ap.add_argument("--control", action="store_true", help="also one more epoch on the training prefixes")
    ap.add_argument("--retrain", action="store_true", help="refit again where the run already has one")
    args = ap.parse_args()
    run = open_run(args.workspace, args.run, args.threads, weights="selected")
    settings, inputs, model = run.settings, run.inputs, run.model
    data = inputs.data
    test = run.split("test")
    held = inputs.cold_eval.held
    new = held.held[test.target.numpy()] if held is not None else None
    state = fit_state(args.run)
    rows: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    rows["selected"] = figures(run, model, test, new) | {"seconds": time.perf_counter() - started}
    print("selected:", {k: round(v, 5) for k, v in rows["selected"].items()}, flush=True)
    pop = build_model(ModelConfig(architecture="pop"), run.catalog)
    assert isinstance(pop, Popularity)
    through = data.through_validation(held.held if held is not None else None)
    for name, counts in (("pop", data.item_counts("train")), ("pop_refit", through.item_counts("train"))):
        pop.fit_counts(counts)
        rows[name] = figures(run, pop, test, new)
    stage = StageRun(settings, Workspace(args.workspace), threads=args.threads)
    run_dir = RunDir(Workspace(args.workspace), args.run.name)
    started = time.perf_counter()
    if run_dir.refit.exists() and not args.retrain:  # trained with train.refit: its own refit
        served = open_run(args.workspace, args.run, args.threads, weights="served").model
        record = json.loads((args.run / "summary.json").read_text())["refit"] | {"from": "the run's own"}
    else:
        refitted = refit(stage, run_dir, model, inputs, state, {}, torch.device("cpu"))
        served, record = refitted.model, refitted.record
    rows["refit"] = figures(run, served, test, new) | {"seconds": time.perf_counter() - started}
    print("refit:", {k: round(v, 5) for k, v in rows["refit"].items()}, flush=True)
    if args.control:  # the selected weights, one more epoch at the last rate, training prefixes only
        cfg, rate = settings.fit_config(), kept_rates(state, settings.fit_config())[-1]
        started = time.perf_counter()
        model.set_serving(False)
        optimizer = Optimizer(model, rate, cfg.weight_decay)
        epoch = len(kept_rates(state, cfg)) + 1
        train_epoch(model, data, optimizer, cfg, epoch, inputs.profiles, torch.device("cpu"))
        model.end_epoch()
        model.set_serving(True)
        rows["control"] = figures(run, model.eval(), test, new) | {"seconds": time.perf_counter() - started}
        print("control:", {k: round(v, 5) for k, v in rows["control"].items()}, flush=True)
    cols = [c for c in rows["selected"] if c != "seconds"]
    print("| test NDCG@10 | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
    out = REPO / "bench" / "results" / f"refit_{args.run.name}.json"
    record = {
        "run": str(args.run),
        "seed": settings.seed,
        "rates": record.get("rates"),
        "refit": record,
        "new_item_targets": None if new is None else int(new.sum()),
        "machine": machine_info(),
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
