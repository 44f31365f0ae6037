"""The evaluation as a person reads it: a markdown table beside the paper's figures, and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ml.evaluation.protocol import ENSEMBLE, Evaluation

# The coil paper's gold-set NOK-F1 (30 OK + 30 NOK coils), for the "paper" column.
PAPER_GOLD_F1 = {"yolo": 0.79, "cnn": 0.75, "siamese": 0.62, ENSEMBLE: 0.80}
PAPER_NOTE = "paper: YOLOv8s 0.79, baseline CNN 0.75, Siamese 0.62, ensemble of three YOLOv8s ≈ +0.01"


def write_report(evaluation: Evaluation, out: Path, title: str = "coilguard evaluation") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "confusion": _plot_confusions(evaluation, out / "confusion_matrices.png"),
        "roc": _plot_roc(evaluation, out / "roc_gold.png"),
        "cv": _plot_cv(evaluation, out / "cv_f1.png"),
    }
    (out / "results.json").write_text(json.dumps(results_dict(evaluation), indent=2, default=_jsonable))
    markdown = render_markdown(evaluation, title, {k: v.name for k, v in plots.items() if v})
    path = out / "report.md"
    path.write_text(markdown)
    return path


def results_dict(evaluation: Evaluation) -> dict[str, Any]:
    return {
        "plan": evaluation.plan.__dict__,
        "dev": evaluation.dev,
        "gold": evaluation.gold,
        "cv": evaluation.cv_summary(),
        "gold_results": {
            g.name: {
                "metrics": g.metrics,
                "f1_interval": g.f1_interval,
                "fit_s": g.fit_s,
                "predict_s": g.predict_s,
                "device": g.device,
                "p_nok": g.p_nok,
            }
            for g in evaluation.gold_results
        },
        "comparison": evaluation.comparison,
        "y_gold": evaluation.y_gold,
    }


def gold_table(evaluation: Evaluation) -> str:
    cv = evaluation.cv_summary()
    lines = [
        "| model | CV NOK-F1 (mean ± sd) | gold NOK precision | recall | NOK-F1 [95 % CI] | paper | OK-F1 | macro-F1 "
        "| accuracy | ROC-AUC | MCC | training s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g in evaluation.gold_results:
        m = g.metrics
        c = cv.get(g.name)
        cv_text = f"{c['f1_mean']:.3f} ± {c['f1_sd']:.3f}" if c else "–"
        paper = PAPER_GOLD_F1.get(g.name)
        lines.append(
            f"| {g.name} | {cv_text} | {m['precision_nok']:.3f} | {m['recall_nok']:.3f} | "
            f"**{m['f1_nok']:.3f}** [{g.f1_interval[0]:.2f}, {g.f1_interval[1]:.2f}] | "
            f"{paper if paper is not None else '–'} | {m['f1_ok']:.3f} | {m['macro_f1']:.3f} | {m['accuracy']:.3f} | "
            f"{_num(m['roc_auc'])} | {m['mcc']:.3f} | {_num(g.fit_s, 0)} |"
        )
    return "\n".join(lines)


def gold_f1_by_model(evaluations: list[Evaluation]) -> dict[str, list[float]]:
    """Gold NOK-F1 of every assessor and the ensemble, one value per evaluation (one per seed)."""
    return {
        g.name: [h.metrics["f1_nok"] for e in evaluations for h in e.gold_results if h.name == g.name]
        for g in evaluations[0].gold_results
    }


def mean_gold_f1(evaluations: list[Evaluation]) -> dict[str, float]:
    """Gold NOK-F1 averaged over evaluations (one per seed): what the quality targets are judged on."""
    return {name: float(np.mean(f1)) for name, f1 in gold_f1_by_model(evaluations).items()}


def seeds_table(evaluations: list[Evaluation]) -> str:
    """One row per model: its gold NOK-F1 on each seed, then mean ± sd (the targets are judged on the mean)."""
    seeds = [e.plan.seed for e in evaluations]
    lines = [
        "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
        "| --- |" + " --- |" * (len(seeds) + 1),
    ]
    for name, f1 in gold_f1_by_model(evaluations).items():
        sd = float(np.std(f1, ddof=1)) if len(f1) > 1 else 0.0
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in f1) + f" | **{np.mean(f1):.3f}** ± {sd:.3f} |")
    return "\n".join(lines)


def render_markdown(evaluation: Evaluation, title: str, plots: dict[str, str]) -> str:
    plan = evaluation.plan
    comparison = evaluation.comparison
    parts = [
        f"# {title}",
        "",
        f"Development data: {evaluation.dev['n_coils']} coils ({evaluation.dev['n_nok']} NOK); "
        f"cross-validation {plan.n_splits} folds × {plan.n_repeats} repeats; gold set "
        f"{evaluation.gold.get('n_ok')} OK + {evaluation.gold.get('n_nok')} NOK coils from a later period "
        f"(labels: {evaluation.gold.get('labels')}). Assessors: {', '.join(plan.kinds)}; the ensemble averages "
        "their calibrated p(NOK) and thresholds at 0.5.",
        "",
        gold_table(evaluation),
        "",
        f"({PAPER_NOTE}.)",
    ]
    if comparison:
        parts += [
            "",
            f"Permutation test, best two on the gold set: {comparison['best']} vs {comparison['second']}, "
            f"NOK-F1 difference {comparison['f1_difference']:+.3f}, p = {comparison['p_value']:.3f} "
            f"({plan.permutations} permutations).",
        ]
    cm = {g.name: g.metrics["confusion"] for g in evaluation.gold_results}
    parts += ["", "Gold-set confusion (tn / fp / fn / tp): " + "; ".join(
        f"{name} {c['tn']}/{c['fp']}/{c['fn']}/{c['tp']}" for name, c in cm.items()
    ) + "."]  # fmt: skip
    for key, caption in (("confusion", "Confusion matrices"), ("roc", "ROC curves"), ("cv", "Cross-validation")):
        if key in plots:
            parts += ["", f"![{caption}]({plots[key]})"]
    return "\n".join(parts) + "\n"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_confusions(evaluation: Evaluation, path: Path) -> Path:
    plt = _pyplot()
    results = evaluation.gold_results
    fig, axes = plt.subplots(1, len(results), figsize=(2.6 * len(results), 2.8), squeeze=False)
    for ax, g in zip(axes[0], results, strict=True):
        c = g.metrics["confusion"]
        matrix = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(matrix, cmap="Blues", vmin=0)
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
        ax.set_xticks([0, 1], ["OK", "NOK"])
        ax.set_yticks([0, 1], ["OK", "NOK"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{g.name}\nF1 {g.metrics['f1_nok']:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_roc(evaluation: Evaluation, path: Path) -> Path:
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for g in evaluation.gold_results:
        fpr, tpr, _ = roc_curve(evaluation.y_gold, g.p_nok)
        ax.plot(fpr, tpr, lw=2 if g.name == ENSEMBLE else 1.2, label=f"{g.name} (AUC {_num(g.metrics['roc_auc'], 2)})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false NOK rate")
    ax.set_ylabel("NOK found")
    ax.set_title("Gold set ROC")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_cv(evaluation: Evaluation, path: Path) -> Path | None:
    names = [n for n in [*evaluation.plan.kinds, ENSEMBLE] if any(f.name == n for f in evaluation.folds)]
    if not names:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    data = [[f.metrics["f1_nok"] for f in evaluation.folds if f.name == n] for n in names]
    ax.boxplot(data, tick_labels=names)
    ax.set_ylabel("NOK-F1 per fold")
    ax.set_title("Cross-validation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
