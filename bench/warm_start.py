"""Benchmark: warm vs cold training on the next night's data.

    python bench/warm_start.py --night1 WS1 --night2 WS2 [--model llm4cdsr] [--epochs 20] [--patience 5]

WS1 and WS2 hold the ingest and enrich outputs of two consecutive nights (e.g. the bundled sample, and
the sample plus new interactions and items: tests/train_data.py `next_night`). Trains night 1 cold, then
night 2 twice: warm-started from night 1's run, and cold (`warm_start: false`). Each in a fresh copy of
the inputs, one torch thread. Prints a table and writes bench/results/warm_start_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bridgerec.runtime.machine import machine_info

REPO = Path(__file__).resolve().parents[1]

import bridgerec.runtime.prefect_env  # noqa: E402, F401
from bridgerec.storage.workspace import Workspace  # noqa: E402
from bridgerec.tasks import StageRun  # noqa: E402
from bridgerec.tasks.train.settings import TrainSettings  # noqa: E402
from bridgerec.tasks.train.stage import TrainSummary, run_train  # noqa: E402


def inputs(src: Path, dst: Path) -> Workspace:
    for stage in ("ingest", "enrich"):
        shutil.copytree(src / stage, dst / stage)
    return Workspace(dst)


def row(label: str, s: TrainSummary) -> dict:
    return {
        "run": label,
        "init": s.init,
        "epochs": s.epochs,
        "best_epoch": s.best_epoch,
        "stage_seconds": round(s.seconds, 2),
        "train_loop_seconds": round(s.train_seconds, 2),
        "init_valid_ndcg10": s.init_valid_ndcg10,
        "valid_ndcg10": s.valid["overall"]["ndcg@10"],
        "test_ndcg10": s.test["overall"]["ndcg@10"],
        "test_full_ndcg10": s.test.get("full", {}).get("overall", {}).get("ndcg@10"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--night1", type=Path, required=True)
    ap.add_argument("--night2", type=Path, required=True)
    ap.add_argument("--model", default="llm4cdsr")
    ap.add_argument("--hidden", type=int, default=32, help="= enrich.local_dim of the workspaces")
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--warm-start-epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/warm_start_<model>.json")
    args = ap.parse_args()
    settings = TrainSettings(
        model=args.model,
        hidden=args.hidden,
        max_len=args.max_len,
        lr=args.lr,
        epochs=args.epochs,
        patience=args.patience,
        warm_start_epochs=args.warm_start_epochs,
        threads=1,
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    try:
        ws1 = inputs(args.night1, tmp / "night1")
        first = run_train(StageRun(settings, ws1))
        ws_warm = inputs(args.night2, tmp / "warm")
        for folder in ("runs", "train"):  # night 1's run and leaderboard: what a nightly workspace holds
            shutil.copytree(ws1.root / folder, ws_warm.root / folder)
        warm = run_train(StageRun(settings, ws_warm))
        cold = run_train(
            StageRun(settings.model_copy(update={"warm_start": False}), inputs(args.night2, tmp / "cold"))
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [row("night 1 (cold)", first), row("night 2 warm", warm), row("night 2 cold", cold)]
    out = args.out or REPO / "bench" / "results" / f"warm_start_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "night1": str(args.night1),
                "night2": str(args.night2),
                "settings": settings.model_dump(mode="json"),
                "machine": machine_info(),
                "runs": rows,
            },
            indent=2,
        )
        + "\n"
    )
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
