"""The LLM table alone on the cold-start splits, no training: what the text can bridge by itself.

    python bench/coldstart_text.py --workspace /tmp/fk [--fraction 0.05] [--seed 42]

A user's vector is the sum of the unit-normalised global LLM embeddings (enrich's PCA table) of the input
items; items are ranked by the inner product with their unit-normalised embedding, over the whole target
domain (full ranking, ties against the target, nothing excluded). The splits are the train stage's
(`train.cold_start`, same fraction and seed: the same held-out items, users and inputs): new items (test
targets that are held-out items, the history as input) and untouched domain (warm targets, every item of
the target's domain hidden). Prints full-ranking NDCG@10 overall and per domain.
"""

import argparse

import numpy as np
import torch

from bridgerec.models.coldstart import choose_new_items, untouched_inputs, without_items
from bridgerec.models.data import SequenceData
from bridgerec.models.metrics import ndcg
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.train.inputs import load_catalog, load_item_tables, load_sequences

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--workspace", required=True)
parser.add_argument("--fraction", type=float, default=0.05)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--max-len", type=int, default=200)
args = parser.parse_args()
torch.set_num_threads(1)
ws = Workspace(args.workspace)
cat, seqs = load_catalog(ws), load_sequences(ws)
E = torch.from_numpy(load_item_tables(ws).global_table)
E = torch.nn.functional.normalize(E, dim=1)
E[0] = 0
held = choose_new_items(cat, seqs, args.fraction, args.seed, None)  # random: as without timestamps
out = without_items(seqs, held)
data = SequenceData(cat, out.sequences, args.max_len)
test = data.eval_split("test", 1, args.seed, 5)


def ranks(inputs: torch.Tensor, target: torch.Tensor, tdom: torch.Tensor) -> np.ndarray:
    """[U] 0-based full-ranking rank of each target in its domain."""
    r = np.zeros(len(target), np.int64)
    for d in range(2):
        idx = torch.nonzero(tdom == d).flatten()
        off, n = int(cat.offsets[d]), int(cat.sizes[d])
        items = E[off + 1 : off + n + 1]
        for ch in torch.split(idx, 2048):
            u = E[inputs[ch]].sum(1)
            s = u @ items.T
            t = target[ch] - off - 1
            ts = s.gather(1, t[:, None])
            r[ch.numpy()] = ((s >= ts).sum(1) - 1).numpy()
    return r


users, inp = untouched_inputs(cat, out.sequences, args.max_len)
keep = ~held[test.target.numpy()][users]  # warm targets only, as the train stage with new items held out
users, inp = users[keep], inp[torch.from_numpy(keep)]
cases = {"untouched domain": (inp, torch.from_numpy(users))}
new = torch.from_numpy(np.flatnonzero(held[test.target.numpy()]))
cases["new items"] = (test.inputs[new], new)
for name, (inputs, idx) in cases.items():
    r = ranks(inputs, test.target[idx], test.target_domain[idx])
    td = test.target_domain[idx].numpy()
    figures = " ".join(f"{d} {ndcg(r[td == i], 10):.4f}" for i, d in enumerate(cat.domains))
    print(f"{name}: {len(idx)} users, full NDCG@10 overall {ndcg(r, 10):.4f} {figures}")
