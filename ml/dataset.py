"""A labelled set of coils in memory and on disk (``.npz`` with ``X``, ``y``, ``coil_id``, ``produced_at``, ``meta``).

``meta`` is one JSON document: dataset-level facts (source, seed, scenario, settings) and, under
``columns``, per-coil lists such as the product's coating class or the simulator's true label. Keeping
it JSON means any tool can read the file without coilguard installed.

One column has a meaning to training: ``learned_by_init`` (true or false per coil) says which coils the model
a fit warm-starts from has learned from; such coils never validate the new model (ReTrain sets it). So has one
dataset-level fact, ``meta["init_validation_current"]``: true where the starting model's validation coils were
put in the line's current regime (ReTrain recalibrated them after a gauge drift), so that they may validate
the new model beside the new coils.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml.matrix import as_matrix_batch

OK, NOK = 0, 1
LABELS = ("OK", "NOK")
LEARNED_BY_INIT = "learned_by_init"
INIT_VALIDATION_CURRENT = "init_validation_current"


@dataclass
class CoilDataset:
    X: np.ndarray  # (N, 264, 18) float32, g/m² per side, NaN = dropped reading
    y: np.ndarray  # (N,) int8, 1 = NOK (the label a model learns from)
    coil_id: np.ndarray  # (N,) str
    produced_at: np.ndarray  # (N,) datetime64[ms]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.X = as_matrix_batch(self.X)
        self.y = _checked_labels(self.y)
        self.coil_id = np.asarray(self.coil_id, dtype=str)
        self.produced_at = np.asarray(self.produced_at, dtype="datetime64[ms]")
        n = len(self.X)
        for name in ("y", "coil_id", "produced_at"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows, X has {n}")
        for name, values in self.columns.items():
            if len(values) != n:
                raise ValueError(f"meta column {name!r} has {len(values)} rows, X has {n}")
        _check_readings(self.X, self.coil_id)

    def __len__(self) -> int:
        return len(self.X)

    @property
    def columns(self) -> dict[str, list[Any]]:
        return self.meta.setdefault("columns", {})

    def column(self, name: str) -> np.ndarray:
        return np.asarray(self.columns[name])

    @property
    def n_nok(self) -> int:
        return int(self.y.sum())

    def subset(self, index: np.ndarray | slice | list[int]) -> CoilDataset:
        idx = np.arange(len(self))[index]
        meta = {k: v for k, v in self.meta.items() if k != "columns"}
        meta["columns"] = {k: [v[i] for i in idx] for k, v in self.columns.items()}
        return CoilDataset(self.X[idx], self.y[idx], self.coil_id[idx], self.produced_at[idx], meta)

    def unique(self) -> CoilDataset:
        """Each coil once (its first row): training sets repeat coils on purpose (ReTrain counts an operator's
        coil several times), a description of the line's coils must not."""
        _, first = np.unique(self.coil_id, return_index=True)
        return self if len(first) == len(self) else self.subset(np.sort(first))

    @classmethod
    def concat(cls, parts: list[CoilDataset]) -> CoilDataset:
        names = set.intersection(*(set(p.columns) for p in parts)) if parts else set()
        meta = {"source": "concat", "parts": [{k: v for k, v in p.meta.items() if k != "columns"} for p in parts]}
        meta["columns"] = {k: [x for p in parts for x in p.columns[k]] for k in sorted(names)}
        return cls(
            np.concatenate([p.X for p in parts]),
            np.concatenate([p.y for p in parts]),
            np.concatenate([p.coil_id for p in parts]),
            np.concatenate([p.produced_at for p in parts]),
            meta,
        )

    def summary(self) -> dict[str, Any]:
        """What a model manifest records about the data it was trained on."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.X).tobytes())
        digest.update(self.y.tobytes())
        return {
            "n_coils": len(self),
            "n_nok": self.n_nok,
            "nok_share": round(self.n_nok / max(len(self), 1), 5),
            "first_produced_at": str(self.produced_at.min()) if len(self) else None,
            "last_produced_at": str(self.produced_at.max()) if len(self) else None,
            "source": self.meta.get("source"),
            "sha256": digest.hexdigest(),
        }

    def content_digest(self) -> str:
        """sha256 of everything :meth:`save` writes. :meth:`summary`'s digest covers only what a model learns from
        (X and y); a kept training set is named by this one, so that changed coil ids, times or columns (which
        ReTrain uses to tell feedback from history and to choose validation coils) are noticed too."""
        digest = hashlib.sha256()
        for array in (np.ascontiguousarray(self.X), self.y, self.produced_at.astype(np.int64)):
            digest.update(array.tobytes())
        digest.update(json.dumps(self.coil_id.tolist()).encode())
        # meta as it reads back from the file (keys become strings, numpy values lists), keys then sorted: the
        # same digest before and after a save, whatever the writer put in
        stored = json.loads(json.dumps(self.meta, default=_json_default))
        digest.update(json.dumps(stored, sort_keys=True).encode())
        return digest.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` file and return its path (numpy adds ``.npz`` to a name without it)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path,
            X=self.X,
            y=self.y,
            coil_id=self.coil_id,
            produced_at=self.produced_at,
            meta=np.array(json.dumps(self.meta, default=_json_default)),
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> CoilDataset:
        with np.load(Path(path), allow_pickle=False) as data:
            return cls(
                X=data["X"],
                y=data["y"],
                coil_id=data["coil_id"],
                produced_at=data["produced_at"],
                meta=json.loads(str(data["meta"])),
            )


def _checked_labels(y: Any) -> np.ndarray:
    """``y`` as int8, refusing anything but OK (0) and NOK (1): a 7 would count as NOK in some sums and as
    neither in others, and int8 would silently wrap a 300 into a 44."""
    raw = np.asarray(y)
    bad = np.flatnonzero(~np.isin(raw, (OK, NOK)))
    if len(bad):
        raise ValueError(
            f"y holds {len(bad)} labels other than {OK} (OK) and {NOK} (NOK): {raw[bad[:5]].tolist()} "
            f"at coil index {bad[:5].tolist()}"
        )
    return raw.astype(np.int8)


def _check_readings(X: np.ndarray, coil_id: np.ndarray) -> None:
    """Refuse infinite readings. NaN is a dropped reading and is filled later; ±inf is no reading at all and
    turns the normalization limits fitted on it into NaN, after which a model abstains on every coil."""
    infinite = np.isinf(X)
    if not infinite.any():
        return
    coils = np.flatnonzero(infinite.any(axis=(1, 2)))
    raise ValueError(
        f"X holds {int(infinite.sum())} infinite readings in {len(coils)} coils, first at coil index "
        f"{coils[0]} ({str(coil_id[coils[0]])!r}); mark a dropped reading with NaN"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
