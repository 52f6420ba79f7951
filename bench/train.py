"""Benchmark: every model x objective side by side on one workspace (CPU), each in its own process.

    python bench/train.py --workspace /tmp/fk [--runs pop,llm4cdsr:bce,llm4cdsr:sampled_softmax]
                          [--epochs 10] [--time-budget 900] [--cold-start] [--set dropout=0.2 ...]
    python bench/train.py --workspace WS --runs llm4cdsr-hybrid+beta=0,llm4cdsr-hybrid --seeds 42,43,44
    python bench/train.py --workspace WS --from-json bench/results/screen/*.json   # tables only

`--runs` lists `model[:objective][+FIELD=VALUE...]` (no objective: the settings' default; `pop` has none;
`+FIELD=VALUE` overrides a train setting for that run only, an ablation). `--seeds` repeats every run
once per seed and adds a table of the mean and sample standard deviation over the seeds. The workspace
needs the ingest and enrich outputs. Prints a Markdown table (sampled and full-ranking HR@10 / NDCG@10
overall and per domain, top-10 catalogue coverage and the share of the 1% most popular items, seconds
per epoch, epochs to best, peak RSS) and writes bench/results/train.json. Training is capped (epochs,
patience, time budget per model): say so when quoting the figures. With --cold-start every run holds out
5% of each domain's items as new and adds the untouched-domain evaluation (train.cold_start,
docs/train.md "Cold start"); a second table shows their column groups beside the warm items of the same
run, with the chance level of each. `--set FIELD=VALUE` (repeatable) overrides any other train setting
for every run (e.g. `--set dropout=0.2 --set device=cuda`); the overrides are in the JSON's args.
Every run also gets a compact row of the figures issue #28 sets goals on (full ranking in multiples of
`pop`, sampled, new items, warm items, untouched domain, short histories, seconds per epoch);
`--from-json` prints those tables for earlier result files together. Each run's entry in the JSON also
keeps its epoch curve (`history`: validation NDCG@10, training loss and learning rate per epoch) and its
short-history figure, which outlive the run folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from harness import run_child

from bridgerec.runtime.machine import machine_info

REPO = Path(__file__).resolve().parents[1]

from bridgerec.tasks.train.settings import MODEL_PRESETS, TrainSettings  # noqa: E402

CHILD = """
import json, sys
from pathlib import Path
import bridgerec.runtime.prefect_env
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.train import TrainSettings
from bridgerec.tasks.train import run_train
sys.path.insert(0, "bench")
from train import authors_protocol, epoch_history, short_history_ndcg
from bridgerec.tasks import StageRun
ws = Workspace(sys.argv[2])
s = run_train(StageRun(TrainSettings.model_validate_json(sys.argv[1]), ws, force=sys.argv[3] == "1"))
out = s.model_dump(mode="json") | {
    "authors_protocol": authors_protocol(Path(s.run_dir), ws),
    "history": epoch_history(s.run_dir),
    "short_history_ndcg@10": short_history_ndcg(s.run_dir),
}
print("RESULT " + json.dumps(out))
"""


def authors_protocol(run_dir: Path, workspace) -> dict:
    """Test HR@10/NDCG@10 under the authors' flawed evaluation, for comparison with their figures only:
    the mixed thread and the domain thread each score their *own* 100 negatives (independent draws), and a
    negative's score adds the two. Single-thread models are unaffected (same as our protocol)."""
    import numpy as np
    import torch

    from bridgerec.models.data import SequenceData
    from bridgerec.models.metrics import rank_sampled, summarise
    from bridgerec.tasks.train.export import load_run
    from bridgerec.tasks.train.inputs import load_sequences

    model, config, catalog = load_run(run_dir, workspace)
    if config["settings"]["architecture"] != "llm4cdsr":  # one thread: the same as our protocol
        return {}
    data = SequenceData(catalog, load_sequences(workspace), config["settings"]["max_len"])
    test = data.eval_split("test", 100, config["settings"]["seed"], 5)
    other, _ = data._candidates(test.target, 100, config["settings"]["seed"] + 1000)  # the second draw
    H = config["settings"]["hidden"]
    ranks = np.zeros(data.n_users, np.int64)
    with torch.no_grad():
        for d in range(len(catalog.domains)):
            items = model.item_vectors(d)
            users = torch.nonzero(test.target_domain == d).flatten()
            for chunk in torch.split(users, 1024):
                u = model.user_vectors(test.inputs[chunk], d)
                mixed = (items[test.candidates[chunk]][..., :H] * u[:, None, :H]).sum(-1)
                local = (items[other[chunk]][..., H:] * u[:, None, H:]).sum(-1)
                absent = (test.candidates[chunk] == 0) | (other[chunk] == 0)  # fewer unseen items than 100
                ranks[chunk.numpy()] = rank_sampled((mixed + local).masked_fill(absent, -torch.inf)).numpy()
    tdom = test.target_domain.numpy()
    out = {"overall": summarise(ranks)}
    for d, name in enumerate(catalog.domains):
        out[name] = summarise(ranks[tdom == d])
    return out


def run_one(settings: TrainSettings, workspace: str, force: bool) -> dict:
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(REPO)) if p)
    env = os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": str(settings.threads or 1)}
    argv = [sys.executable, "-c", CHILD, settings.model_dump_json(), workspace, "1" if force else "0"]
    line = [ln for ln in run_child(argv, env=env, cwd=REPO).splitlines() if ln.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"error: {settings.model} printed no result")
    return json.loads(line[-1].removeprefix("RESULT "))


def table(results: list[dict], domains: list[str]) -> str:
    """One row per run: NDCG@10 / HR@10 (test) sampled and full, overall and per domain; beyond accuracy
    (full ranking, top-10) per domain; epochs, seconds per epoch, peak RSS."""
    cols = ["model", "objective"]
    for protocol in ("sampled", "full"):
        cols += [f"{protocol} {g} NDCG@10 / HR@10" for g in ["overall", *domains]]
    cols += [f"coverage@10 {g}" for g in domains] + [f"top-1% share {g}" for g in domains]
    cols += ["epochs (best)", "s/epoch", "peak RSS MB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = [r.get("label", r["model"]), r.get("objective", "")]
        for protocol in ("sampled", "full"):
            src = r["test"] if protocol == "sampled" else r["test"].get("full", {})
            for group in ["overall", *domains]:
                m = src.get(group, {})
                cells.append(f"{m.get('ndcg@10', float('nan')):.4f} / {m.get('hr@10', float('nan')):.4f}")
        full = r["test"].get("full", {})
        cells += [f"{full.get(g, {}).get('coverage@10', float('nan')):.4f}" for g in domains]
        cells += [f"{full.get(g, {}).get('top1pct_share@10', float('nan')):.3f}" for g in domains]
        cells += [
            f"{r['epochs']} ({r['best_epoch']})",
            f"{r['epoch_seconds']:.1f}",
            f"{r['peak_rss_mb']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cold_table(results: list[dict], domains: list[str]) -> str:
    """Column groups of the cold-start evaluations: NDCG@10 full ranking (sampled in brackets) per domain,
    new items | warm items of the same run | untouched domain, each with the chance level (full) and the
    full-ranking AUC (chance 0.5; readable on groups too small for NDCG@10 to separate from chance); then
    the new-item targets ranked among the held-out items only and the new items' share of the test top-10
    lists (their order, and their exposure)."""
    groups = [
        ("new_items", "new items"),
        ("warm_items", "warm items"),
        ("untouched_domain", "untouched domain"),
    ]
    cols = ["model"]
    for _, label in groups:
        cols += [f"{label}: users"] + [f"{label} {d} NDCG@10 full (sampled)" for d in domains]
        cols += [f"{label} chance full {'/'.join(domains)}", f"{label} AUC full {'/'.join(domains)}"]
    cols += ["new / warm full NDCG@10", "new items among new items NDCG@10 (chance)", "new_item_share@10"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cold = r.get("cold_start") or {}
        cells = [r.get("label", r["model"])]
        for key, _ in groups:
            g = cold.get(key)
            if g is None:
                cells += ["-"] * (len(domains) + 3)
                continue
            cells.append(str(g["users"]))
            cells += [f"{g['full'][d]['ndcg@10']:.4f} ({g[d]['ndcg@10']:.4f})" for d in domains]
            cells.append("/".join(f"{g['chance_ndcg@10']['full'][d]:.5f}" for d in domains))
            cells.append("/".join(f"{g['auc'][d]:.3f}" for d in domains) if "auc" in g else "-")
        new, warm = cold.get("new_items"), cold.get("warm_items")
        ratio = (
            new["full"]["overall"]["ndcg@10"] / warm["full"]["overall"]["ndcg@10"] if new and warm else None
        )
        cells.append("-" if ratio is None else f"{ratio:.2f}")
        among = (new or {}).get("among_new_items")  # results from before 2026-12-04 night lack it
        cells.append(f"{among['overall']['ndcg@10']:.4f} ({among['chance_ndcg@10']:.4f})" if among else "-")
        share = r["test"].get("full", {}).get("overall", {}).get("new_item_share@10")
        cells.append("-" if share is None else f"{share:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metric_rows(run_dir: str) -> list[dict]:
    """The run's metrics.parquet as rows (empty when the run folder is gone)."""
    import pyarrow.parquet as pq

    path = Path(run_dir) / "metrics.parquet"
    return pq.read_table(path).to_pylist() if path.is_file() else []


def epoch_history(run_dir: str) -> list[dict]:
    """Per epoch: the full-ranking (or sampled) validation NDCG@10, the training loss and the learning rate
    (`lr_decay`), from the run's metrics.parquet, so the result file keeps the curve after the run folder
    is gone."""
    epochs: dict[int, dict] = {}
    for r in _metric_rows(run_dir):
        if r["users"] is not None or r["split"] not in ("valid", "train"):  # the final evaluation has users
            continue
        if r["split"] == "valid" and r["metric"] != "ndcg@10":
            continue
        key = f"valid_{r['protocol']}_ndcg@10" if r["split"] == "valid" else r["metric"]
        if r["split"] == "train" and key not in ("loss", "lr"):
            continue
        epochs.setdefault(int(r["epoch"]), {"epoch": int(r["epoch"])})[key] = r["value"]
    return [epochs[e] for e in sorted(epochs)]


def short_history_ndcg(run_dir: str) -> float:
    """Test full-ranking NDCG@10 of the users with the shortest histories (group `short`), from the run's
    metrics.parquet (nan when the run folder is gone)."""
    rows = _metric_rows(run_dir)
    found = [
        r["value"]
        for r in rows
        if r["split"] == "test"
        and r["protocol"] == "full"
        and r["group"] == "short"
        and r["metric"] == "ndcg@10"
    ]
    return found[0] if found else float("nan")


def compact_table(results: list[dict], domains: list[str]) -> str:
    """One row per run, the figures issue #28 sets goals on: full-ranking test NDCG@10 overall and per
    domain (in multiples of `pop`'s when a `pop` run is among the results), sampled NDCG@10, new items
    (full, per domain), warm items of the same run, the untouched domain, the short-history users,
    validation, the text prior's weight (with the validation figure at w = 0: the one the weight was
    not chosen on), epochs and seconds per epoch (training only)."""
    pop = next((r for r in results if r["model"] == "pop"), None)

    def full(r: dict, g: str) -> float:
        return float(r["test"]["full"][g]["ndcg@10"])

    cols = ["run", "seed", "epochs (best)", "valid full", "test full overall"]
    cols += [f"{d} (x pop)" for d in domains] + ["sampled overall", *[f"sampled {d}" for d in domains]]
    cols += [
        "new items full overall / " + " / ".join(domains),
        "warm items full",
        "untouched " + " / ".join(domains),
    ]
    cols += ["short-history full", "text prior w, c on new items (valid full at w = 0)", "s / epoch"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = [r.get("label", r["model"]), str(r.get("seed", "")), f"{r['epochs']} ({r['best_epoch']})"]
        cells.append(
            f"{r['valid']['full']['overall']['ndcg@10']:.4f}" if r.get("valid", {}).get("full") else "-"
        )
        cells.append(f"{full(r, 'overall'):.4f}")
        for d in domains:
            times = f" ({full(r, d) / full(pop, d):.1f}x)" if pop and full(pop, d) > 0 else ""
            cells.append(f"{full(r, d):.4f}{times}")
        cells += [
            f"{r['test']['overall']['ndcg@10']:.4f}",
            *[f"{r['test'][d]['ndcg@10']:.4f}" for d in domains],
        ]
        cold = r.get("cold_start") or {}
        new, warm, untouched = cold.get("new_items"), cold.get("warm_items"), cold.get("untouched_domain")
        cells.append(
            " / ".join(f"{new['full'][g]['ndcg@10']:.4f}" for g in ["overall", *domains]) if new else "-"
        )
        cells.append(f"{warm['full']['overall']['ndcg@10']:.4f}" if warm else "-")
        cells.append(
            " / ".join(f"{untouched['full'][d]['ndcg@10']:.4f}" for d in domains) if untouched else "-"
        )
        short = r.get("short_history_ndcg@10")
        if short is None:  # result files from before it was kept: the run folder, if it is still there
            short = short_history_ndcg(r["run_dir"]) if r.get("run_dir") else float("nan")
        cells.append(f"{short:.4f}")
        prior = r.get("text_prior") or {}
        at_zero = (prior.get("valid_ndcg@10") or {}).get("0.0")
        c = f", x{prior['new_items']:g}" if "new_items" in prior else ""  # c: since 2026-12-04
        cells.append(f"{prior['weight']:g}{c} ({at_zero:.4f})" if prior and at_zero is not None else "-")
        cells.append(f"{r['epoch_seconds']:.1f}" if r["model"] != "pop" else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_table(results: list[dict], domains: list[str]) -> str:
    """One row per run label (its seeds pooled): mean +- sample standard deviation over the seeds of the
    test NDCG@10, sampled and full ranking, overall and per domain, and of the best epoch."""
    import statistics

    def cell(values: list[float], digits: int = 4) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.{digits}f} +- {sd:.{digits}f}"

    def group(r: dict) -> str:
        """A label names a run relative to the defaults of its day, so runs are pooled by their settings
        (seed aside); files written before the settings were kept tell the 2026-12-03 default (the text
        prior on) from the one before by the prior's summary."""
        if "settings" in r:
            return r["label"] + "\0" + json.dumps(r["settings"], sort_keys=True)
        return r["label"] + ("\0text prior" if r.get("text_prior") else "")

    keys = list(dict.fromkeys(group(r) for r in results))
    base = {k: k.split("\0")[0] for k in keys}
    names = dict(base)
    for k in keys:  # the same label with other settings: told apart by a number
        twins = [j for j in keys if base[j] == base[k]]
        if len(twins) > 1:
            names[k] += f" (settings {twins.index(k) + 1} of {len(twins)})"
    cols = ["run", "seeds"]
    cols += [f"{p} {g} NDCG@10" for p in ("sampled", "full") for g in ["overall", *domains]]
    cols += ["valid full NDCG@10", "best epoch"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for key in keys:
        rs = [r for r in results if group(r) == key]
        cells = [names[key], ",".join(str(r["seed"]) for r in rs)]
        for protocol in ("sampled", "full"):
            for g in ["overall", *domains]:
                src = [r["test"] if protocol == "sampled" else r["test"]["full"] for r in rs]
                cells.append(cell([m[g]["ndcg@10"] for m in src]))
        cells.append(cell([r["valid"]["full"]["overall"]["ndcg@10"] for r in rs]))
        cells.append(cell([float(r["best_epoch"]) for r in rs], 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_overrides(pairs: list[str]) -> dict:
    """`["dropout=0.2", "device=cuda"]` -> `{"dropout": 0.2, "device": "cuda"}`; unknown fields are an error."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in TrainSettings.model_fields:
            raise SystemExit(f"error: --set {pair!r}: expected FIELD=VALUE with FIELD a train setting")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def main() -> None:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The module docstring as written, and every option's default in its help."""

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument(
        "--workspace", required=True, help="A workspace with ingest and enrich outputs (runs go to WS/runs)."
    )
    parser.add_argument(
        "--runs",
        default=",".join(MODEL_PRESETS),
        help="model[:objective][+FIELD=VALUE...] list, e.g. pop,llm4cdsr:bce,llm4cdsr-hybrid+beta=0",
    )
    parser.add_argument(
        "--seeds",
        default="",
        help="Comma-separated seeds: every run once per seed, plus a mean/spread table.",
    )
    parser.add_argument("--epochs", type=int, default=8, help="Epochs at most per run.")
    parser.add_argument(
        "--patience", type=int, default=3, help="Early stopping: epochs without a better validation."
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=900.0,
        help="Seconds per model of training and per-epoch validation (checked at each epoch boundary).",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run.")
    parser.add_argument("--batch-size", type=int, default=128, help="Users per training batch.")
    parser.add_argument(
        "--bidirectional", action="store_true", help="Bidirectional attention (the authors' leaky setting)."
    )
    parser.add_argument("--adapter-init", default="xavier", choices=["xavier", "torch"])
    parser.add_argument("--select-by", default="full", choices=["full", "sampled"])
    parser.add_argument("--force", action="store_true", help="Retrain runs that already finished.")
    parser.add_argument(
        "--cold-start",
        action="store_true",
        help="Both cold-start evaluations in every run (new items held out).",
    )
    parser.add_argument(
        "--new-items-in-validation",
        action="store_true",
        help="With --cold-start: held-out items stay where they are validation targets (removed from "
        "training only; train.cold_start.new_items_in_validation).",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="Override a train setting for every run (repeatable; VALUE parsed as JSON, else a string).",
    )
    parser.add_argument(
        "--out",
        default=str(REPO / "bench" / "results" / "train.json"),
        help="The JSON to write (the default overwrites the committed results).",
    )
    parser.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="JSON",
        help="Train nothing: print the tables of earlier result files (their runs together), then exit.",
    )
    args = parser.parse_args()
    if args.from_json:
        results = []
        for path in args.from_json:
            found = json.loads(Path(path).read_text()).get("results")
            if found is None:  # another bench's JSON beside these (bench/epoch_cost.py's): not a run
                print(f"skipped {path}: no training results in it", file=sys.stderr)
                continue
            results += found
        domains = [k for k in results[0]["test"] if k not in ("overall", "full")]
        print(compact_table(results, domains))
        if len({r.get("seed") for r in results}) > 1:
            print(seed_table([r for r in results if r["model"] != "pop"], domains))
        return
    overrides = parse_overrides(args.set)

    seeds: list[int | None] = [int(x) for x in args.seeds.split(",") if x.strip()]
    results = []
    for spec, seed in [(spec, seed) for spec in args.runs.split(",") for seed in seeds or [None]]:
        head, *extra = spec.split("+")
        name, _, objective = head.partition(":")
        fields = dict(
            model=name,
            epochs=args.epochs,
            patience=args.patience,
            time_budget_s=args.time_budget,
            threads=args.threads,
            batch_size=args.batch_size,
            causal=not args.bidirectional,
            adapter_init=args.adapter_init,
            select_by=args.select_by,
            warm_start=False,  # a comparison of models: every run from a random init, never an earlier run
            cold_start={
                "new_items": args.cold_start,
                "untouched_domain": args.cold_start,
                "new_items_in_validation": args.cold_start and args.new_items_in_validation,
            },
            **({"objective": objective} if objective else {}),
        )
        run_overrides = overrides | parse_overrides(extra) | ({"seed": seed} if seed is not None else {})
        settings = TrainSettings(**(fields | run_overrides))  # --set and +FIELD win, validated as any setting
        started = time.perf_counter()
        r = run_one(settings, args.workspace, args.force)
        r["wall_seconds"] = time.perf_counter() - started
        r["objective"] = "" if name == "pop" else settings.objective
        r["label"], r["seed"] = spec, settings.seed
        r["settings"] = settings.model_dump(mode="json", exclude={"seed"})  # a label means "the default then"
        results.append(r)
        print(
            f"{spec} (seed {settings.seed}): {r['epochs']} epochs (best {r['best_epoch']}), {r['epoch_seconds']:.1f} s/epoch, "
            f"test ndcg@10 {r['test']['overall']['ndcg@10']:.4f}, full {r['test']['full']['overall']['ndcg@10']:.4f}",
            flush=True,
        )
    domains = [k for k in results[0]["test"] if k not in ("overall", "full")]
    print(table(results, domains))
    print(compact_table(results, domains))
    if seeds:
        print(seed_table(results, domains))
    if args.cold_start:
        print(cold_table(results, domains))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "workspace": args.workspace,
                "args": vars(args),
                "machine": machine_info(),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
