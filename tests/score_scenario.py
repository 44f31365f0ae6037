"""A random history of votes, operator feedback, corrections and promotions, shared by the SQLite and the
PostgreSQL tests of ModelScore's incremental tallies: after every pass they must equal a full recount."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import Engine, text

from ml.ensemble import MemberVote
from services.db.repositories import SqlCoilStore, SqlModelRegistry, SqlScoreStore
from workflows.ports import AssessedCoil, ModelScoreRow

LATER = timedelta(days=1)  # "now" for the recount: after every vote of the scenario


def counts(rows: list[ModelScoreRow]) -> dict[str, tuple[int, ...]]:
    return {f"{r.name}/v{r.version}": (r.n_coils, r.n_correct, r.tp, r.predicted_nok, r.actual_nok) for r in rows}


def assessed_coil(coil_id: str, votes: list[MemberVote], at: datetime | None = None) -> AssessedCoil:
    """A decided coil with a blank matrix, labelled as its first vote says."""
    at = at or datetime.now(UTC)
    return AssessedCoil(
        coil_id=coil_id,
        line="galv-1",
        produced_at=at,
        received_at=at,
        decided_at=at,
        label=votes[0].label,
        p_nok=0.5,
        confidence=0.5,
        matrix=np.zeros((264, 18), np.float32),
        product=None,
        votes=votes,
    )


class History:
    """Models ``a`` and ``img`` (which abstains on half the coils); coils and feedback come in rounds."""

    def __init__(self, engine: Engine, seed: int = 0) -> None:
        self.engine = engine
        self.rng = np.random.default_rng(seed)
        self.registry = SqlModelRegistry(engine)
        self.store = SqlScoreStore(engine)
        self.ids: dict[tuple[str, int], int] = {}
        self.coil_ids: list[str] = []
        for name, kind in (("a", "cnn"), ("img", "ssim_ae")):
            self.add_version(name, kind, 1)

    def add_version(self, name: str, kind: str, version: int) -> int:
        record = self.registry.add(
            name=name, kind=kind, version=version, artifact_uri=f"{name}/v{version}", sha256="x", status="active"
        )
        self.ids[(name, version)] = record.id
        return record.id

    def assess(self, n: int, versions: dict[str, int]) -> None:
        """``n`` new coils, each voted on by the given version of every model."""
        batch = []
        for _ in range(n):
            coil_id = f"C{len(self.coil_ids):05d}"
            self.coil_ids.append(coil_id)
            votes = []
            for name, version in versions.items():
                if name == "img" and self.rng.random() < 0.5:
                    votes.append(MemberVote(name, version, "ABSTAIN", None, None))
                else:
                    votes.append(MemberVote(name, version, str(self.rng.choice(["OK", "NOK"])), 0.5, 0.5))
            batch.append(assessed_coil(coil_id, votes))
        SqlCoilStore(self.engine).save_assessed(batch, self.ids)

    def give_feedback(self, n: int) -> None:
        """``n`` rows with plain SQL: on coils with and without earlier feedback, some back-dated (a late
        arrival that is *not* the latest word), several in one transaction (same ``now()``, id decides)."""
        with self.engine.begin() as conn:
            for _ in range(n):
                coil_id = str(self.rng.choice(self.coil_ids))
                label = str(self.rng.choice(["OK", "NOK"], p=[0.7, 0.3]))
                if self.rng.random() < 0.2:
                    conn.execute(
                        text("INSERT INTO feedback (coil_id, label, operator, created_at) VALUES (:c, :l, 'late', :t)"),
                        {"c": coil_id, "l": label, "t": datetime.now(UTC) - timedelta(hours=1)},
                    )
                else:
                    conn.execute(
                        text("INSERT INTO feedback (coil_id, label, operator) VALUES (:c, :l, 'anna')"),
                        {"c": coil_id, "l": label},
                    )

    def edit_by_hand(self) -> None:
        """Counted rows changed behind ModelScore's back, as an operator tool or a clean-up would: labels flipped
        with UPDATE, rows back-dated (an older word is no longer the latest), rows deleted, and a coil deleted with
        its votes and feedback."""
        with self.engine.begin() as conn:
            conn.execute(
                text("UPDATE feedback SET label = CASE label WHEN 'OK' THEN 'NOK' ELSE 'OK' END WHERE id % 5 = 0")
            )
            conn.execute(text("UPDATE feedback SET created_at = :t WHERE id % 7 = 1"), {"t": datetime.now(UTC) - LATER})
            conn.execute(text("DELETE FROM feedback WHERE id % 11 = 2"))
            coil = conn.execute(text("SELECT coil_id FROM feedback ORDER BY id LIMIT 1")).scalar_one()
            conn.execute(text("DELETE FROM coils WHERE coil_id = :c"), {"c": coil})
        self.coil_ids.remove(coil)

    def check(self) -> dict[str, tuple[int, ...]]:
        """One ModelScore pass; its tallies must equal the full recount, and it leaves no reset waiting (its own
        stamping of the rows it counts is no edit). Returns the tallies."""
        now = datetime.now(UTC) + LATER
        tallied = counts(self.store.agreement(now, None))
        assert tallied == counts(self.store.recount(now))
        with self.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM score_resets")).scalar_one() == 0
        return tallied


def run_history(engine: Engine, seed: int = 0) -> History:
    """Rounds of coils and feedback, a promotion, a rollback to the old version: checked after each."""
    h = History(engine, seed)
    h.assess(40, {"a": 1, "img": 1})
    assert h.check()["a/v1"] == (0, 0, 0, 0, 0)  # no feedback yet
    for _ in range(3):
        h.give_feedback(25)
        h.check()
        h.assess(10, {"a": 1, "img": 1})
    before = h.check()
    assert h.store.count_new_feedback() == 0 and h.check() == before  # nothing new: nothing changes
    assert before["a/v1"][0] > 10

    h.add_version("a", "cnn", 2)  # a challenger promoted: its window starts now, with no votes yet
    assert h.check()["a/v2"] == (0, 0, 0, 0, 0)
    h.assess(30, {"a": 2, "img": 1})
    for _ in range(3):
        h.give_feedback(25)  # also corrects coils a/v1 voted on: those stay outside a/v2's window
        h.check()
    h.registry.promote(h.ids[("a", 1)])  # rolled back to v1: its window starts again
    h.assess(20, {"a": 1, "img": 1})
    h.give_feedback(30)
    h.check()
    h.edit_by_hand()  # counted rows changed: the next pass starts the tallies again
    h.give_feedback(10)
    h.check()
    h.give_feedback(10)  # and goes on counting only what is new
    assert h.store.count_new_feedback() == 10
    h.check()
    return h
