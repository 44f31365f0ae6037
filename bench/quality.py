"""Gold-set quality of every assessor and the ensemble, and their training times (issue 4's benchmark).

Runs the coil paper's protocol (``ml.evaluation.protocol``) at the assessors' default settings: each
assessor trained once on the development data (4,542 simulated coils, as many as the paper had), then
judged on the gold set (30 OK + 30 NOK coils from a later, mildly drifted period), with bootstrap
intervals and a permutation test between the best two. Cross-validation repeats are optional (they
multiply the time by folds × repeats). The figures go into docs/benchmarks.md, the full report with
plots into ``--out``.

    .venv/bin/python bench/quality.py                       # gold set, all four, default settings
    .venv/bin/python bench/quality.py --repeats 1 --folds 5 # plus one 5-fold cross-validation
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, provenance, write_section
from ml.evaluation.protocol import ENSEMBLE, Plan, evaluate
from ml.evaluation.report import PAPER_NOTE, gold_table, write_report
from ml.sim import gold_set
from services.cli.models import parse_setting
from services.progress import make_progress
from workflows.training import training_data

TARGET_F1 = 0.90


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assessors", default="cnn,yolo,effnet,siamese")
    parser.add_argument("--data", default="sim:4542")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=0, help="cross-validation repeats (0: gold set only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KIND.KEY=VALUE",
        help="an assessor setting, e.g. yolo.epochs=15 (default: every assessor's defaults)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "bench-quality")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()

    kinds = [k.strip() for k in args.assessors.split(",") if k.strip()]
    settings: dict[str, dict] = {k: {} for k in kinds}
    for text in args.overrides:
        key, value = parse_setting(text)
        kind, _, name = key.partition(".")
        settings.setdefault(kind, {})[name] = value
    plan = Plan(
        kinds=kinds,
        settings=settings,
        n_splits=args.folds,
        n_repeats=args.repeats,
        seed=args.seed,
        device=args.device,
    )
    dev = training_data(args.data, seed=args.seed)
    gold = gold_set(seed=args.seed)
    with make_progress() as progress:
        task = progress.add_task("quality", total=plan.n_fits, status="")

        def on_event(event: dict) -> None:
            if event.get("done"):
                progress.advance(task)
            else:
                progress.update(task, status=f"{event['stage']}: {event['kind']}")

        evaluation = evaluate(dev, gold, plan, on_event)
    report = write_report(evaluation, args.out, title="coilguard quality benchmark")
    table = gold_table(evaluation)
    print(table)
    print(f"report with plots: {report}")

    results = {g.name: g for g in evaluation.gold_results}
    ensemble = results[ENSEMBLE].metrics["f1_nok"]
    best_single = max((g for g in evaluation.gold_results if g.name != ENSEMBLE), key=lambda g: g.metrics["f1_nok"])
    verdict = (
        f"Ensemble gold NOK-F1 {ensemble:.3f}: target ≥ {TARGET_F1:.2f} "
        f"{'met' if ensemble >= TARGET_F1 else 'MISSED'}; best single assessor {best_single.name} "
        f"{best_single.metrics['f1_nok']:.3f}, so the ensemble is "
        f"{'not below' if ensemble >= best_single.metrics['f1_nok'] else 'BELOW'} it."
    )
    comparison = evaluation.comparison
    test = (
        f"Permutation test of the best two ({comparison['best']} vs {comparison['second']}): NOK-F1 difference "
        f"{comparison['f1_difference']:+.3f}, p = {comparison['p_value']:.3f}."
        if comparison
        else ""
    )
    print(verdict)
    if not args.no_write:
        write_section(
            "quality",
            "\n\n".join(
                [
                    "## Model quality on the gold set (issue 4)",
                    provenance(),
                    f"Development data {evaluation.dev['n_coils']} simulated coils ({evaluation.dev['n_nok']} NOK), "
                    f"settings: {_describe(settings)}; gold set 30 OK + 30 NOK coils from a later, mildly drifted "
                    f"period. Training time is one fit on all development data on this machine ({PAPER_NOTE}).",
                    table,
                    verdict + (" " + test if test else ""),
                ]
            ),
        )


def _describe(settings: dict[str, dict]) -> str:
    changed = [f"{kind}.{k}={v}" for kind, values in settings.items() for k, v in values.items()]
    return "every assessor's defaults" + (f" except {', '.join(changed)}" if changed else "")


if __name__ == "__main__":
    main()
