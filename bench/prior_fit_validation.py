"""How validation sees the text prior's scale on new items: every (w, c) on a saved cold-start run.

    python bench/prior_fit_validation.py --workspace WS --run WS/runs/RUN_ID [--values 1,1.1,1.25,1.5,2]
                                         [--untrained]

Scores the run's validation split again with `models.evaluate.fit_text_prior` over the run's
`text_prior_grid` and the values of c given, and reports each pair's full-ranking NDCG@10 over every
target, over the targets that are new items (no training interactions) and over the others. Beside the
choice the train stage makes (the best overall figure) it prints the choice when the new-item targets
are reweighted to the share of the catalogue's items that are new: (1 - s) * warm + s * new (what
`train.text_prior_new_items_share: catalogue` chooses on, `PriorFit.chosen_on`), an
importance weight for the shift between validation's new-item targets and the catalogue's new items
(exact where new items are a random draw of the catalogue, as `cold_start.new_items` draws them).
docs/train.md, "New items against their exposure", compares both with the test figures of
`bench/new_item_exposure.py` on the same runs. With --untrained it also fits the same model untrained
(`untrained_prior_fit`, built from the run's seed) and prints the choices of
`train.text_prior_new_items_guard` (`PriorFit.floored`): `untrained`, the best pair among those whose
figure over the new-item targets reaches the untrained model's; `exposure`, among those whose new items'
share of the top-10 slots reaches its share; `auto`, the first where the untrained model's figure has a
relative standard error of at most the run's `text_prior_new_items_guard_rse`, else the second. Writes bench/results/screen/prior_fit_validation_<run id>.json
(with other --values: ..._<run id>_c_<values>.json, e.g. _c_1.25-1.375-1.5-2 for the default grid).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from saved_run import open_run, run_arguments

from bridgerec.models.evaluate import catalogue_new_items, catalogue_new_share, fit_text_prior
from bridgerec.runtime.machine import machine_info
from bridgerec.tasks.train.settings import MIN_NEW_TARGETS
from bridgerec.tasks.train.stage import guard_floor_on, untrained_prior_fit, untrained_rse

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VALUES = "1,1.1,1.25,1.5,2"


def main() -> None:
    ap = run_arguments(__doc__)
    ap.add_argument("--values", default=DEFAULT_VALUES, help="values of c (text_prior_new_items) to try")
    ap.add_argument(
        "--untrained",
        action="store_true",
        help="also fit the same model untrained and print text_prior_new_items_guard's choice",
    )
    args = ap.parse_args()
    run = open_run(args.workspace, args.run, args.threads, weights="selected")  # fitted on validation
    model, config, settings = run.model, run.config, run.settings
    if not getattr(model, "prior_dims", 0):
        raise SystemExit("error: the run has no text prior (train.text_prior)")
    valid = run.split("valid")
    share = catalogue_new_share(model)  # s: the catalogue's share of new items
    new_items = catalogue_new_items(model)
    started = time.perf_counter()
    fit = fit_text_prior(
        model, valid, settings.text_prior_grid, settings.eval_batch_size, "cpu",
        new_items_grid=[float(x) for x in args.values.split(",")], min_new_targets=MIN_NEW_TARGETS,
    )  # fmt: skip
    weighed = replace(fit, share=share)  # the figure `text_prior_new_items_share: catalogue` chooses on
    rows = [
        {"w": w, "c": c, "all": f, "new": fit.ndcg10_new[(w, c)], "new_se": fit.ndcg10_new_se[(w, c)]}
        | {"warm": fit.ndcg10_warm[(w, c)]}
        | {"reweighted": weighed.chosen_on((w, c)), "new_share@10": fit.new_share[(w, c)]}
        for (w, c), f in sorted(fit.ndcg10.items())
    ]
    reweighted = max(rows, key=lambda r: r["reweighted"])  # max keeps the first (smallest) of equals
    untrained, guarded = None, {}
    if args.untrained:  # the floors of `text_prior_new_items_guard`, fitted on the same grids
        values = [float(x) for x in args.values.split(",")]
        same = settings.model_copy(update={"text_prior_new_items": None, "text_prior_new_items_grid": values})
        _, ref = untrained_prior_fit(same, model, run.inputs, valid, "cpu")
        key = (ref.weight, ref.new_items)
        untrained = {"w": ref.weight, "c": ref.new_items, "all": ref.ndcg10[key], "new": ref.ndcg10_new[key]}
        untrained["new_share@10"] = ref.new_share[key]
        untrained["new_se"], untrained["new_rse"] = ref.ndcg10_new_se[key], untrained_rse(ref)
        for guard in ("untrained", "exposure", "auto"):
            on = guard_floor_on(settings.model_copy(update={"text_prior_new_items_guard": guard}), ref)
            rule = fit.floored(ref.on(on)[key], on)  # the guard's choice (the model is not touched)
            guarded[guard] = [rule.weight, rule.new_items] if rule.floor_met else None
            untrained[f"{guard}_floor_on"] = on
    users = int(valid.inputs.shape[0])
    print(
        f"validation: {users} users, {fit.new_targets} targets are new items ({fit.new_targets / users:.1%});"
    )
    print(f"catalogue: {new_items} new items ({share:.1%}); fitted in {time.perf_counter() - started:.0f} s")
    print(
        "| w | c | all targets | new-item targets | the others | reweighted to the catalogue's share "
        "| new items' share of the top-10 slots |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['w']:g} | {r['c']:g} | {r['all']:.5f} | {r['new']:.5f} | {r['warm']:.5f} | {r['reweighted']:.5f} "
            f"| {r['new_share@10']:.4f} |"
        )
    print(
        f"chosen: plain ({fit.weight:g}, {fit.new_items:g}); reweighted ({reweighted['w']:g}, {reweighted['c']:g})"
    )
    if untrained is not None:
        print(
            f"untrained: ({untrained['w']:g}, {untrained['c']:g}), all targets {untrained['all']:.5f}, "
            f"new-item targets {untrained['new']:.5f} +- {untrained['new_se']:.5f} (relative standard error "
            f"{untrained['new_rse']:.1%}), new items' share of the top-10 slots "
            f"{untrained['new_share@10']:.4f}"
        )
        for guard, pair in guarded.items():
            got = "none reaches it (the plain one)" if pair is None else f"({pair[0]:g}, {pair[1]:g})"
            on = untrained[f"{guard}_floor_on"]
            print(f"text_prior_new_items_guard: {guard} (a floor on {on}) chooses {got}")
    record = {
        "run": str(args.run),
        "seed": settings.seed,
        "new_items_in_validation": settings.cold_start.new_items_in_validation,
        "users": users,
        "new_targets": fit.new_targets,
        "new_items": new_items,
        "items": sum(int(n) for n in model.sizes),
        "chosen": [fit.weight, fit.new_items],
        "chosen_reweighted": [reweighted["w"], reweighted["c"]],
        "untrained": untrained,
        "chosen_guarded": guarded.get("untrained"),  # None: no pair reached the floor (or no --untrained)
        "chosen_exposure_guarded": guarded.get("exposure"),
        "chosen_auto_guarded": guarded.get("auto"),  # at the run's text_prior_new_items_guard_rse
        "seconds": time.perf_counter() - started,
        "machine": machine_info(),
        "rows": rows,
    }
    suffix = "" if args.values == DEFAULT_VALUES else "_c_" + args.values.replace(",", "-")
    out = REPO / "bench" / "results" / "screen" / f"prior_fit_validation_{config['run_id']}{suffix}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
