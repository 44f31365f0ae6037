"""What an image assessor trains on: grayscale images in [0, 1], a class per image, optional defect masks.

An image assessor fits on an :class:`ImageSet`, or on a :class:`~ml.dataset.CoilDataset` of coil matrices,
which :meth:`ImageSet.from_coils` renders as images (the coil paper's "matrix as a grayscale image").
``nok`` is what the coil vote needs (any defect class is NOK); ``labels`` and ``classes`` keep the defect
type for the multi-class few-shot models; ``masks`` (True = defect pixel) serve the segmenter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

OK_CLASSES = frozenset({"ok", "free", "mt_free", "good", "defect_free"})
WHOLE_SET_META = ("sha256", "counts")  # what a folder's meta says of all of it, not of a subset


@dataclass
class ImageSet:
    images: list[np.ndarray]  # each (H, W) float32 in [0, 1]; sizes may differ
    labels: np.ndarray  # (N,) int: index into ``classes``
    classes: list[str]
    masks: list[np.ndarray] | None = None  # each (H, W) bool, same size as its image
    names: list[str] = field(default_factory=list)  # file names or coil ids, for reports
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.images)
        if len(self.labels) != n:
            raise ValueError(f"{len(self.labels)} labels for {n} images")
        if self.masks is not None and len(self.masks) != n:
            raise ValueError(f"{len(self.masks)} masks for {n} images")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError("a label is outside the class list")
        if not self.names:
            self.names = [str(i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nok(self) -> np.ndarray:
        """(N,) int8, 1 where the image shows a defect (its class is not a defect-free one)."""
        defect = np.array([c.lower() not in OK_CLASSES for c in self.classes], dtype=bool)
        return defect[self.labels].astype(np.int8) if len(self) else np.zeros(0, np.int8)

    def subset(self, index: np.ndarray | list[int]) -> ImageSet:
        """These images. The folder's digest and counts describe the whole set, so they move under ``subset_of``: a
        manifest must not name two different few-shot draws by the same data (their own digest is
        ``folder.content_digest``)."""
        idx = [int(i) for i in np.arange(len(self))[index]]
        meta = {k: v for k, v in self.meta.items() if k not in WHOLE_SET_META}
        if whole := {k: self.meta[k] for k in WHOLE_SET_META if k in self.meta}:
            meta["subset_of"] = {**whole, "n_images": len(self)}
        return ImageSet(
            [self.images[i] for i in idx],
            self.labels[idx],
            list(self.classes),
            [self.masks[i] for i in idx] if self.masks is not None else None,
            [self.names[i] for i in idx],
            meta,
        )

    @classmethod
    def from_coils(cls, dataset: Any, size: int = 128) -> ImageSet:
        """Coil matrices (a CoilDataset) as ``size`` × ``size`` grayscale images, labelled OK/NOK."""
        from ml.normalize import Normalizer
        from ml.training.render import render_gray

        normalizer = Normalizer.fit(dataset.X)
        x = normalizer.transform(dataset.X)
        rendered = render_gray(x, size, "tile")[:, 0].numpy()
        return cls(
            list(rendered),
            np.asarray(dataset.y, dtype=np.int64),
            ["OK", "NOK"],
            names=[str(c) for c in dataset.coil_id],
            meta={"source": "coils", "coils": dataset.summary(), "normalization": normalizer.to_dict()},
        )
