"""Progress bars for long work (training, evaluation, the demo), drawn with rich on the terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def make_progress(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        transient=transient,
    )


@contextlib.contextmanager
def fit_progress(description: str, epochs: int) -> Iterator[Any]:
    """A callback for ``Assessor.fit`` that advances one bar per epoch and shows the losses."""
    with make_progress() as progress:
        task = progress.add_task(description, total=epochs, status="")

        def on_epoch(row: dict[str, Any]) -> None:
            status = f"loss {row['train_loss']:.3f}  val {row['val_loss']:.3f}  val F1 {row['val_f1']:.2f}"
            progress.update(task, completed=row["epoch"], total=row["epochs"], status=status)

        yield on_epoch
