"""ReTrain's inputs after years of operator feedback: what reading the labelled coils and building the
challenger's training set cost in time and memory.

ReTrain reads every operator-labelled coil (``SqlFeedbackStore.labelled_coils``), splits off the newest as the
holdout, and trains on the champion's history plus the rest, each labelled coil three times (``combine``). The
feedback only grows. Per size: one scratch PostgreSQL database with that many labelled coils (real 264 × 18
float32 matrices, stored as the workers store them, 1 % of the readings dropped as gauges drop them; 3 % NOK)
and a champion history of 3,000 coils; the stages
run in a process of their own, whose peak resident memory (``VmHWM``) is what a CronJob's memory limit meets:
reading, building the training set, and normalizing it as the challenger's fit begins (the champion's scale).
No training beyond that: its time grows with the training set's rows, which the table gives.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import provenance, scratch_database, write_section

HISTORY = 3000  # coils of the champion's own training set (the demo's and the benchmarks' simulated history)
DAY_OF_FEEDBACK = 50  # labelled coils a day, the rate operations.md plans with


def peak_mb() -> float:
    """This process's peak resident memory so far (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def with_dropped(X: np.ndarray, rng: np.random.Generator, share: float = 0.01) -> np.ndarray:
    """``share`` of the readings dropped (NaN), as the line's gauges drop them: normalizing fills them."""
    X[rng.random(X.shape) < share] = np.nan
    return X


def child(url: str) -> dict:
    """The stages ReTrain runs before training, timed, with the peak memory after each."""
    from ml.dataset import CoilDataset
    from ml.normalize import Normalizer
    from services.db.engine import make_engine
    from services.db.repositories import SqlFeedbackStore
    from workflows.retrain import RetrainConfig, combine, split_by_time

    rng = np.random.default_rng(0)
    history = CoilDataset(
        with_dropped(rng.normal(140, 4, (HISTORY, 264, 18)).astype(np.float32), rng),
        (rng.random(HISTORY) < 0.03).astype(np.int8),
        np.array([f"H-{i}" for i in range(HISTORY)]),
        np.full(HISTORY, np.datetime64("2025-01-01T00:00:00", "ms")),
    )
    out = {"baseline_mb": peak_mb()}
    engine = make_engine(url)
    start = time.perf_counter()
    labelled = SqlFeedbackStore(engine).labelled_coils()
    out |= {"read_s": time.perf_counter() - start, "read_mb": peak_mb(), "labelled": len(labelled)}
    config = RetrainConfig()
    start = time.perf_counter()
    train_part, holdout = split_by_time(labelled, config.holdout_fraction, config.min_holdout, config.min_nok_for_f1)
    data = combine(history, train_part, config.feedback_weight, withheld=[c.coil_id for c in holdout])
    out |= {"combine_s": time.perf_counter() - start, "combine_mb": peak_mb(), "rows": len(data)}
    start = time.perf_counter()
    Normalizer(100.0, 180.0).transform(data.X)  # what start_matrix_fit does with the champion's normalizer
    out |= {"normalize_s": time.perf_counter() - start, "normalize_mb": peak_mb()}
    engine.dispose()
    return out


def fill(url: str, n: int) -> None:
    """``n`` decided coils, each with one operator verdict, a minute apart."""
    from sqlalchemy import text

    from services.db.engine import make_engine

    rng = np.random.default_rng(1)
    matrix = with_dropped(rng.normal(140, 4, (264, 18)).astype("<f4"), rng).tobytes()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO coils (coil_id, line, status, produced_at, received_at, decided_at, published_at, matrix) "
                "SELECT 'C-' || i, 'galv-1', 'OK', t, t, t, t, :m FROM generate_series(1, :n) AS i, "
                "LATERAL (SELECT now() - make_interval(mins => :n - i) AS t) AS at"
            ),
            {"n": n, "m": matrix},
        )
        conn.execute(
            text(
                "INSERT INTO feedback (coil_id, label, operator, created_at) "
                "SELECT 'C-' || i, CASE WHEN i % 33 = 0 THEN 'NOK' ELSE 'OK' END, 'bench', "
                "now() - make_interval(mins => :n - i) FROM generate_series(1, :n) AS i"
            ),
            {"n": n},
        )
        conn.execute(text("ANALYZE"))
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--no-write", action="store_true", help="print, leave docs/benchmarks.md alone")
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    rows = []
    for n in args.sizes:
        with scratch_database() as url:
            fill(url, n)
            run = subprocess.run([sys.executable, __file__, "--child", url], capture_output=True, text=True, check=True)
        got = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append((n, got))
        print(n, got, flush=True)
    body = "\n".join(
        [
            "## ReTrain's inputs after years of feedback",
            "",
            provenance(),
            "",
            f"Per row: that many labelled coils in a scratch PostgreSQL database on the same machine, a champion "
            f"history of {HISTORY:,} coils, ReTrain's default settings (each labelled coil three times, the newest "
            f"30 % held out). Peak memory is the process's resident high-water mark after each stage (the Python "
            f"process with its libraries loaded reads about {rows[0][1]['baseline_mb']:.0f} MB before them). At "
            f"{DAY_OF_FEEDBACK} labelled coils a day, 10,000 are about seven months of feedback, 100,000 five and a "
            "half years.",
            "",
            "| labelled coils | read them (s) | peak after reading (MB) | build the training set (s) | "
            "peak after it (MB) | normalize it (s) | peak after it (MB) | training set rows |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *[
                f"| {n:,} | {g['read_s']:.1f} | {g['read_mb']:,.0f} | {g['combine_s']:.1f} | {g['combine_mb']:,.0f} "
                f"| {g['normalize_s']:.1f} | {g['normalize_mb']:,.0f} | {g['rows']:,} |"
                for n, g in rows
            ],
        ]
    )
    print(body)
    if not args.no_write:
        write_section("retrain-scale", body)


if __name__ == "__main__":
    main()
