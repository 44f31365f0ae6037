"""The gold set: a balanced, truly labelled set of coils from a later period of the same line.

As in the coil-coating paper, models are judged on 30 OK + 30 NOK coils "selected from a later time
period, representing unknown data not seen during model development". Here that period is the
same line (same seed, so the same knives and gauges) some 100,000 coils later, after a *mild* drift
has set in: by default ``sensor-drift`` at severity 0.3 (two gauges reading 5–7 % low, one 5 %
high: below what makes a coil look NOK, enough to make the data not quite the training data).
Labels are the true labels, not the operators': the gold set is what a careful laboratory check
would say. Coils keep their production order; borderline coils are not filtered out (they are the
hard residue a good model may still get wrong).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import numpy as np

from ml.dataset import CoilDataset
from ml.sim.config import LineConfig
from ml.sim.drift import DriftConfig
from ml.sim.line import LineSimulator, SimCoil, coils_to_dataset

GOLD_FIRST_INDEX = 100_000
GOLD_START = datetime(2029, 3, 1, 6, 0, tzinfo=UTC)
GOLD_DRIFT = DriftConfig(scenario="sensor-drift", start=GOLD_FIRST_INDEX, ramp=0, severity=0.3)


def gold_set(
    seed: int = 0,
    n_ok: int = 30,
    n_nok: int = 30,
    *,
    drift: DriftConfig | None = GOLD_DRIFT,
    config: LineConfig | None = None,
    max_coils: int = 200_000,
) -> CoilDataset:
    """``n_ok`` true-OK and ``n_nok`` true-NOK coils from a later period of line ``seed``; ``y`` = true label.

    ``config`` (default ``LineConfig(seed=seed)``) is the line; its period, id prefix ("G") and drift are
    replaced by the gold set's. ``drift=None`` gives a later period without drift.
    """
    base = config or LineConfig(seed=seed)
    if drift is not None and drift.start is None:
        drift = replace(drift, start=GOLD_FIRST_INDEX)
    cfg = replace(base, seed=seed, first_index=GOLD_FIRST_INDEX, start=GOLD_START, id_prefix="G", drift=drift)
    sim = LineSimulator(cfg)
    ok: list[SimCoil] = []
    nok: list[SimCoil] = []
    for coil in sim.stream():
        if coil.true_label and len(nok) < n_nok:
            nok.append(coil)
        elif not coil.true_label and len(ok) < n_ok:
            ok.append(coil)
        if (len(ok) >= n_ok and len(nok) >= n_nok) or sim.index - GOLD_FIRST_INDEX >= max_coils:
            break
    if len(ok) < n_ok or len(nok) < n_nok:
        raise RuntimeError(f"found {len(ok)} OK and {len(nok)} NOK coils in {max_coils}; raise max_coils")
    coils = sorted(ok + nok, key=lambda c: c.index)
    ds = coils_to_dataset(coils, sim, first_index=GOLD_FIRST_INDEX)
    ds.y = np.array([c.true_label for c in coils], dtype=np.int8)
    ds.meta.update(source="sim-gold", labels="true", n_ok=n_ok, n_nok=n_nok, coils_scanned=sim.index - GOLD_FIRST_INDEX)
    return ds


def gold_for(dev: CoilDataset, seed: int) -> CoilDataset:
    """The gold set for development data ``dev``: a later period of the line ``dev`` was simulated on (its seed
    and settings, from its ``meta``), whatever ``seed`` the evaluation's folds and fits use; data from no recorded
    line (a plant's export, a ReTrain's kept history) is judged on line ``seed``'s. A ``.npz`` written by
    ``coilguard dataset --seed 7`` was otherwise judged on line 0's gold set: other knives and gauges, not a
    later period of its own line, and :func:`check_apart` did not look."""
    if dev.meta.get("source") != "sim" or dev.meta.get("seed") is None:
        return gold_set(seed=seed)
    config = dev.meta.get("config")
    # the gold period has its own drift: the data's is not read (one recorded before today's bounds would be refused)
    line = LineConfig.from_dict({**config, "drift": None}) if isinstance(config, dict) else None
    return gold_set(seed=int(dev.meta["seed"]), config=line)


def check_apart(dev: CoilDataset, gold: CoilDataset) -> None:
    """Refuse development data from the gold set's own line that reaches into its period: a simulated coil's
    readings come from the line's seed and its index, so ``sim:N`` with N beyond :data:`GOLD_FIRST_INDEX` holds
    the gold coils themselves (but for the gold period's mild drift), and the gold figures would be no test."""
    if dev.meta.get("source") != "sim" or dev.meta.get("seed") != gold.meta.get("seed"):
        return
    if "index" in dev.columns:  # each coil's own index: a subset of a longer stretch keeps its first_index
        end = int(np.max(dev.column("index"), initial=-1)) + 1
    else:
        end = int(dev.meta.get("first_index") or 0) + len(dev)
    if end > GOLD_FIRST_INDEX:
        raise ValueError(
            f"the development data runs to coil {end} of line {dev.meta['seed']}, into its gold period (from coil "
            f"{GOLD_FIRST_INDEX}): keep it below coil {GOLD_FIRST_INDEX}"
        )
