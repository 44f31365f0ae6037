"""Progress bars for long work (training, evaluation, the demo), drawn with rich on the terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# What an epoch row may carry, as (key, label, format). The coil classifiers report a validation
# NOK-F1, the segmenter an IoU, the few-shot classifiers the defect type's accuracy, the autoencoder
# only its losses: each row shows what it has, so one bar serves every assessor.
EPOCH_FIELDS = (
    ("train_loss", "loss", ".3f"),
    ("val_loss", "val", ".3f"),
    ("val_f1", "val F1", ".2f"),
    ("val_iou", "val IoU", ".2f"),
    ("val_accuracy", "val acc", ".2f"),
)

# The validation figures a finished fit is summed up by, as (key, label); the same reasoning.
VALIDATION_FIELDS = (
    ("f1_nok", "NOK-F1"),
    ("roc_auc", "ROC-AUC"),
    ("iou", "IoU"),
    ("class_accuracy", "defect-type accuracy"),
    ("dssim", "DSSIM"),
)


def make_progress(transient: bool = False, console: Console | None = None) -> Progress:
    """``console``: where the bar is drawn (rich's default is stdout; a benchmark whose result goes to stdout
    passes ``Console(stderr=True)``)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        transient=transient,
        console=console,
    )


def epoch_status(row: Mapping[str, Any]) -> str:
    """The figures an epoch row holds (absent or None ones left out)."""
    return "  ".join(f"{label} {row[key]:{fmt}}" for key, label, fmt in EPOCH_FIELDS if row.get(key) is not None)


def validation_summary(validation: Mapping[str, Any]) -> str:
    """The headline validation figures of a fit, or a plain statement that it had none."""
    parts = [f"{label} {validation[key]:.3f}" for key, label in VALIDATION_FIELDS if validation.get(key) is not None]
    return "validation " + ", ".join(parts) if parts else "no validation figures"


@contextlib.contextmanager
def fit_progress(description: str, epochs: int, console: Console | None = None) -> Iterator[Any]:
    """A callback for ``Assessor.fit`` that advances one bar per epoch and shows the losses."""
    with make_progress(console=console) as progress:
        task = progress.add_task(description, total=epochs, status="")

        def on_epoch(row: dict[str, Any]) -> None:
            progress.update(task, completed=row["epoch"], total=row["epochs"], status=epoch_status(row))

        yield on_epoch
