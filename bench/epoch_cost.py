"""Cost of a training epoch, side by side: every run spec's training step timed on the same batches,
interleaved, so a busy machine slows every spec alike and the ratios hold.

    python bench/epoch_cost.py --workspace WS --runs llm4cdsr-hybrid,llm4cdsr-hybrid+task=cloze
                               [--batches 40] [--rounds 3] [--threads 2]

For each spec (as in bench/train.py: `model[+FIELD=VALUE...]`) it builds the model on the workspace's
ingest and enrich outputs and times forward, backward and optimizer step on `--batches` training
batches of one epoch's order (seeded, the same users for every spec), `--rounds` times, the specs in
turn, each round followed by the model's end-of-epoch work (`end_epoch`: id_text_fit's ridge fit), timed
apart. Prints ms per batch (median over rounds), the ratio to the first spec, the end-of-epoch seconds
and the epoch it implies (ms per batch x batches per epoch + end of epoch; without validation) with its
ratio to the first spec's; writes JSON with the machine block.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bridgerec.runtime.machine import machine_info

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--runs", default="llm4cdsr-hybrid")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "epoch_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bridgerec.models.data import SequenceData
    from bridgerec.models.objectives import sampling_probs
    from bridgerec.models.optim import Optimizer
    from bridgerec.models.registry import build_model
    from bridgerec.models.trainer import epoch_positions, training_batch
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.train import TrainSettings
    from bridgerec.tasks.train.inputs import load_catalog, load_item_tables, load_sequences

    sys_path = str(REPO / "bench")
    import sys

    sys.path.insert(0, sys_path)
    from train import parse_overrides

    ws = Workspace(args.workspace)
    catalog, sequences, tables = load_catalog(ws), load_sequences(ws), load_item_tables(ws)
    specs = args.runs.split(",")
    setups = []
    for spec in specs:
        head, *extra = spec.split("+")
        settings = TrainSettings(model=head, **parse_overrides(extra))
        data = SequenceData(catalog, sequences, settings.max_len)
        torch.manual_seed(0)
        model_spec = settings.model_spec(tables.global_table.shape[1], tables.local_tables[0].shape[1], 0)
        model = build_model(model_spec, catalog, tables)
        model.set_trained_items(data.item_counts("train"))
        cfg = settings.fit_config()
        probs = None
        if model_spec.objective == "sampled_softmax":
            counts = torch.from_numpy(data.item_counts("train"))
            probs = sampling_probs(
                counts, model.sizes, [int(o) for o in catalog.offsets], model_spec.sampling
            )
        n_batches = math.ceil(data.n_users / cfg.batch_size)
        norm = (
            epoch_positions(data.train_lengths, model_spec) / n_batches if cfg.loss_norm == "global" else None
        )
        setups.append((spec, data, model, Optimizer(model, cfg.lr), cfg, probs, norm, n_batches))
    order = list(setups[0][1].train_batches(setups[0][4].batch_size, torch.Generator().manual_seed(0)))
    # every spec trains on the same users, a spread of batch lengths (the order is random)
    chosen = order[: args.batches]
    times: dict[str, list[float]] = {s[0]: [] for s in setups}
    fits: dict[str, list[float]] = {s[0]: [] for s in setups}  # seconds of the end-of-epoch work
    for r in range(args.rounds):
        for spec, data, model, opt, cfg, probs, norm, _ in setups if r % 2 == 0 else reversed(setups):
            model.train()
            gen = torch.Generator().manual_seed(r)
            started = time.perf_counter()
            for users in chosen:
                prefix = data.train_prefix(users)
                if prefix.shape[1] < 2:
                    continue
                batch = training_batch(data, prefix, users, model.config, cfg, gen, probs, norm)
                loss, _ = model.loss(batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
            times[spec].append(1000 * (time.perf_counter() - started) / len(chosen))
            started = time.perf_counter()
            model.end_epoch()  # once per epoch: id_text_fit's ridge fit, else nothing
            fits[spec].append(time.perf_counter() - started)
            print(f"round {r}: {spec}: {times[spec][-1]:.0f} ms a batch", flush=True)
    base = statistics.median(times[specs[0]])
    base_epoch = base * setups[0][-1] / 1000 + statistics.median(fits[specs[0]])
    rows = []
    for spec, *_, n_batches in setups:
        ms, fit = statistics.median(times[spec]), statistics.median(fits[spec])
        epoch = ms * n_batches / 1000 + fit
        rows.append({"run": spec, "ms_per_batch": round(ms, 1), "ratio": round(ms / base, 3),
                     "batches_per_epoch": n_batches, "end_epoch_seconds": round(fit, 2),
                     "epoch_seconds_implied": round(epoch, 1), "epoch_ratio": round(epoch / base_epoch, 3),
                     "rounds_ms": [round(t, 1) for t in times[spec]]})  # fmt: skip
    print(
        "\n| run | ms / batch (median) | x first | end of epoch s | implied epoch s (training) | epoch x first |"
        "\n|---|---|---|---|---|---|"
    )
    for row in rows:
        print(
            f"| {row['run']} | {row['ms_per_batch']} | {row['ratio']} | {row['end_epoch_seconds']} "
            f"| {row['epoch_seconds_implied']} | {row['epoch_ratio']} |"
        )
    out = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
           "load_avg": list(np.round(__import__("os").getloadavg(), 1))}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
