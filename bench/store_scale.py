"""The database over years of service: what the announce pass, migration 0007 and the model pages cost then.

One scratch PostgreSQL database: ``--coils`` decided and announced coils (a real matrix lives out of line, so a
one-byte one stands in), a few unannounced ones, and four models scored every 5 minutes for ``--years`` years of
``mperformance`` rows. Timed: building 0007's partial index on that table (the workers' inserts wait that long),
the scheduler's announce pass reading what is left (its page and its count), ``GET /models`` and ReTrain's
latest scores.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import text

from bench.common import provenance, scratch_database, write_section
from services.api.queries import model_versions
from services.db import migrate
from services.db.engine import make_engine
from services.db.repositories import SqlCoilStore, SqlScoreStore, UnannouncedWindow

SCORES_A_YEAR = 365 * 24 * 12  # ModelScore every 5 minutes


def timed(call: Callable[[], object], repeats: int = 5) -> float:
    """Median milliseconds of ``repeats`` calls after one to warm up."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--coils", type=int, default=1_000_000)
    parser.add_argument("--years", type=float, default=1.0)
    parser.add_argument("--no-write", action="store_true", help="print, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    scores = round(args.years * SCORES_A_YEAR)
    with scratch_database() as url:
        migrate.downgrade(url, "0006")
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO coils (coil_id, line, status, decided_at, published_at, received_at, matrix) "
                    "SELECT 'C-' || i, 'galv-' || (i % 3), 'OK', now() - make_interval(secs => i), now(), "
                    "now() - make_interval(secs => i), '\\x00'::bytea FROM generate_series(1, :n) AS i"
                ),
                {"n": args.coils},
            )
            conn.execute(
                text(
                    "INSERT INTO coils (coil_id, line, status, decided_at, received_at, matrix) "
                    "SELECT 'U-' || i, 'galv-new', 'NOK', now() - make_interval(mins => 20 + i), now(), '\\x00'::bytea "
                    "FROM generate_series(1, 100) AS i"
                )
            )
            for name in ("cnn", "yolo", "effnet", "siamese"):
                conn.execute(
                    text(
                        "INSERT INTO models (name, kind, version, status, promoted_at) VALUES "
                        "(:n, :n, 1, 'retired', now() - interval '800 days'), "
                        "(:n, :n, 2, 'active', now() - interval '400 days')"
                    ),
                    {"n": name},
                )
            conn.execute(
                text(
                    "INSERT INTO mperformance (model_id, computed_at, window_end, n_coils, n_correct, score, "
                    "below_threshold) SELECT m.id, now() - make_interval(secs => (:n - g) * 300), now(), 100, 90, 0.9, "
                    "false FROM models m, generate_series(1, :n) AS g WHERE m.status = 'active'"
                ),
                {"n": scores},
            )
            conn.execute(text("ANALYZE"))
        start = time.perf_counter()
        migrate.upgrade(url)
        index_s = time.perf_counter() - start
        with engine.begin() as conn:
            conn.execute(text("ANALYZE coils"))
        store, now = SqlCoilStore(engine), datetime.now(UTC)
        window = UnannouncedWindow(now - timedelta(minutes=10), 500, since=now - timedelta(days=1))
        page_ms = timed(lambda: store.unannounced(window))
        count_ms = timed(lambda: store.count_unannounced(now - timedelta(minutes=10), now - timedelta(days=1)))
        latest_ms = timed(SqlScoreStore(engine).latest)
        models_ms = timed(lambda: model_versions(engine))
        engine.dispose()
    rows = [
        ("migration 0007 (partial index of the unannounced decisions) on the coils table", f"{index_s:.2f} s"),
        ("announce pass: a page of 500 unannounced decisions (of 100 waiting)", f"{page_ms:.2f} ms"),
        ("announce pass: the count of what is left", f"{count_ms:.2f} ms"),
        ("ReTrain's latest score per active model (`SqlScoreStore.latest`)", f"{latest_ms:.1f} ms"),
        ("`GET /models` (`model_versions`)", f"{models_ms:.1f} ms"),
    ]
    body = "\n".join(
        [
            "## The database over years of service (announce pass, migration 0007, model pages)",
            "",
            provenance(),
            "",
            f"{args.coils:,} decided and announced coils plus 100 unannounced, four active models with "
            f"{scores:,} `mperformance` rows each ({args.years:g} × 365 days of ModelScore every 5 minutes); "
            "PostgreSQL on the same machine. Median of 5 calls after a warm-up.",
            "",
            "| figure | time |",
            "| --- | --- |",
            *[f"| {what} | {value} |" for what, value in rows],
        ]
    )
    print(body)
    if not args.no_write:
        write_section("store-scale", body)


if __name__ == "__main__":
    main()
