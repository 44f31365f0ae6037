"""Assessor discovery through the ``coilguard.assessors`` entry-point group.

A separate package adds an assessor by declaring, in its own ``pyproject.toml``::

    [project.entry-points."coilguard.assessors"]
    mykey = "my_package.module:MyAssessor"

and nothing in coilguard changes. The entry point's name must equal the class's ``key``.
"""

from __future__ import annotations

import logging
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from ml.assessors.base import Assessor
from ml.assessors.manifest import ArtifactError, Manifest

GROUP = "coilguard.assessors"
log = logging.getLogger(__name__)


class UnknownAssessor(KeyError):
    def __str__(self) -> str:
        return f"no assessor {self.args[0]!r}; installed: {', '.join(sorted(available())) or 'none'}"


def available() -> dict[str, type[Assessor]]:
    """Every installed assessor class by key. Looked up afresh each call: installs can change at run time.

    A plug-in that fails to import is logged and left out, so one broken package cannot take every
    other assessor down with it; so is a key two packages declare (:func:`assessor_class` refuses it).
    """
    found: dict[str, type[Assessor]] = {}
    for key, eps in _declared().items():
        try:
            found[key] = _load(_one(key, eps))
        except Exception as exc:
            log.error("assessor plug-in %s is unusable: %s", key, exc)
    return found


def assessor_class(key: str) -> type[Assessor]:
    eps = _declared(key).get(key)
    if not eps:
        raise UnknownAssessor(key)
    return _load(_one(key, eps))


def _declared(key: str | None = None) -> dict[str, list[EntryPoint]]:
    """The entry points of the group by key, one per target (an install seen twice on the path is one)."""
    found: dict[str, dict[str, EntryPoint]] = {}
    for ep in entry_points(group=GROUP) if key is None else entry_points(group=GROUP, name=key):
        found.setdefault(ep.name, {}).setdefault(ep.value, ep)
    return {name: list(targets.values()) for name, targets in found.items()}


def _one(key: str, eps: list[EntryPoint]) -> EntryPoint:
    """The key's only target. Two packages declaring one key would each be picked somewhere (by install order),
    and a model trained by one loaded by the other."""
    if len(eps) > 1:
        raise TypeError(f"assessor key {key!r} is declared by {' and '.join(ep.value for ep in eps)}: uninstall one")
    return eps[0]


def _load(ep: EntryPoint) -> type[Assessor]:
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Assessor)):
        raise TypeError(f"entry point {ep.name} = {ep.value} is not an Assessor subclass")
    if cls.key != ep.name:
        raise TypeError(f"entry point {ep.name} points at an assessor whose key is {cls.key!r}")
    return cls


def create(key: str, settings: dict | None = None, *, name: str | None = None) -> Assessor:
    """A new, untrained assessor; a shared setting it would ignore (``Settings.ignored``) is refused."""
    cls = assessor_class(key)
    cls.Settings.refuse_ignored(settings or {})
    return cls(settings, name=name)


def load_artifact(directory: str | Path, *, allow_legacy: bool = False, expected_sha256: str | None = None) -> Assessor:
    """Load whichever assessor a model folder holds, verifying its manifest (and its checksum against
    ``expected_sha256``, the registry's, when given; ``allow_legacy`` only with it: see :meth:`Assessor.load`)."""
    manifest = Manifest.read(Path(directory))
    try:
        cls = assessor_class(manifest.kind)
    except Exception as exc:  # not installed, declared twice, or its plug-in does not import
        raise ArtifactError(f"{directory}: {exc}") from None
    return cls.load(directory, allow_legacy=allow_legacy, expected_sha256=expected_sha256)
