"""The LLM table alone on the cold-start splits, no training: what the text can bridge by itself.

    python bench/coldstart_text.py --workspace /tmp/fk [--fraction 0.05] [--seed 42] [--out R.json]

A user's vector is the sum of the unit-normalised global LLM embeddings (enrich's PCA table) of the input
items; items are ranked by the inner product with their unit-normalised embedding, over the whole target
domain (full ranking, ties against the target). New items: the user's earlier items of the target's
domain are left out of the ranking, as the train stage's full ranking leaves them out
(`models.evaluate.left_out`), so the bound and the model are ranked alike; `--no-exclude` keeps them in
(the protocol of issue #28's 0.0059, where a user's own earlier items crowd the top 10). Untouched
domain: nothing to leave out (the user has no earlier item of the domain in that scenario). The splits are the train stage's
(`train.cold_start`, same fraction and seed: the same held-out items, users and inputs): new items (test
targets that are held-out items, the history as input) and untouched domain (warm targets, every item of
the target's domain hidden), and the new items ranked among the held-out items only (the train stage's
`among_new_items`). Prints full-ranking NDCG@10 overall and per domain; `--out` also writes them as JSON
with the embedding model's id and the machine.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bridgerec.models.coldstart import choose_new_items, untouched_inputs, without_items
from bridgerec.models.data import SequenceData
from bridgerec.models.evaluate import left_out
from bridgerec.models.metrics import ndcg
from bridgerec.runtime.machine import machine_info
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.train.inputs import load_catalog, load_item_tables, load_sequences

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--workspace", required=True)
parser.add_argument("--fraction", type=float, default=0.05)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--max-len", type=int, default=200)
parser.add_argument(
    "--no-exclude",
    action="store_true",
    help="rank new items among the user's earlier items too (issue #28's bound)",
)
parser.add_argument(
    "--new-items-in-validation",
    action="store_true",
    help="the split of train.cold_start.new_items_in_validation (held-out validation targets kept)",
)
parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
args = parser.parse_args()
torch.set_num_threads(1)
ws = Workspace(args.workspace)
cat, seqs = load_catalog(ws), load_sequences(ws)
E = torch.from_numpy(load_item_tables(ws).global_table)
E = torch.nn.functional.normalize(E, dim=1)
E[0] = 0
held = choose_new_items(cat, seqs, args.fraction, args.seed, None)  # random: as without timestamps
out = without_items(seqs, held, keep_validation=args.new_items_in_validation)
data = SequenceData(cat, out.sequences, args.max_len)
test = data.eval_split("test", 1, args.seed, 5)


ex_offsets = np.searchsorted(test.exclude_users, np.arange(len(test.target) + 1))


def ranks(
    inputs: torch.Tensor,
    rows: torch.Tensor | None,
    target: torch.Tensor,
    tdom: torch.Tensor,
    members: np.ndarray | None = None,
) -> np.ndarray:
    """[U] 0-based full-ranking rank of each target in its domain; `rows`: the users' rows of the test
    split, whose earlier items of the domain are left out (None: nothing left out); `members` ([N + 1]
    bool by global id): only those items compete (the train stage's `among_new_items`)."""
    r = np.zeros(len(target), np.int64)
    for d in range(2):
        idx = torch.nonzero(tdom == d).flatten()
        off, n = int(cat.offsets[d]), int(cat.sizes[d])
        items = E[off : off + n + 1].clone()  # [n + 1, Dg]: column = local id
        items[0] = 0  # the padding
        for ch in torch.split(idx, 2048):
            u = E[inputs[ch]].sum(1)
            s = u @ items.T  # [B, n + 1]
            t = target[ch] - off  # [B] local ids
            s[:, 0] = -torch.inf
            if members is not None:
                s[:, ~torch.from_numpy(members[off : off + n + 1])] = -torch.inf
            if rows is not None:
                r_, c_ = left_out(t, rows[ch], test, ex_offsets)
                s[r_, c_] = -torch.inf
            ts = s.gather(1, t[:, None])
            r[ch.numpy()] = ((s >= ts).sum(1) - 1).numpy()
    return r


users, inp = untouched_inputs(cat, out.sequences, args.max_len)
keep = ~held[test.target.numpy()][users]  # warm targets only, as the train stage with new items held out
users, inp = users[keep], inp[torch.from_numpy(keep)]
cases = {"untouched domain": (inp, torch.from_numpy(users), False)}
new = torch.from_numpy(np.flatnonzero(held[test.target.numpy()]))
cases["new items"] = (test.inputs[new], new, not args.no_exclude)
cases["new items among the held-out items"] = (test.inputs[new], new, not args.no_exclude)
results: dict[str, dict[str, float]] = {}
for name, (inputs, idx, exclude) in cases.items():
    among = held if name.endswith("held-out items") else None
    r = ranks(inputs, idx if exclude else None, test.target[idx], test.target_domain[idx], among)
    td = test.target_domain[idx].numpy()
    results[name] = {"users": len(idx), "overall": ndcg(r, 10)}
    results[name] |= {d: ndcg(r[td == i], 10) for i, d in enumerate(cat.domains)}
    figures = " ".join(f"{d} {results[name][d]:.4f}" for d in cat.domains)
    print(f"{name}: {len(idx)} users, full NDCG@10 overall {results[name]['overall']:.4f} {figures}")
if args.out is not None:
    manifest = ws.read_manifest("enrich")
    report = {
        "workspace": args.workspace,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "embed_model_id": manifest.stats.get("embed_model_id") if manifest else None,
        "machine": machine_info(),
        "full_ndcg@10": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
