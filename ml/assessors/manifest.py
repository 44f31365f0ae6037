"""The manifest written beside every model's weights: what produced the model, and proof it is intact.

A plant must be able to answer "which data, which code, which settings made the model that called
this coil NOK?" years later, and must never serve a weights file that was altered or half-written.

The manifest is not only a description: a loaded model takes its threshold, normalization limits,
settings and (image classifiers) class list from it, so an edited manifest changes predictions as
surely as edited weights. Since integrity version 2 the artifact's checksum (:attr:`Manifest.weights_sha256`,
the ``sha256`` of its registry row) therefore covers the manifest's content as well as the weight files.
Version 1 manifests, written by older releases, carry no ``integrity`` field; their checksum keeps the
old definition (weight files only) so that their registry rows still match. As nothing in the folder checks
their content, :meth:`Manifest.verify` refuses them unless the caller opts in (``allow_legacy``) because it
compares the checksum with the registry's too.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Collection
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, Field, ValidationError

MANIFEST_FILE = "manifest.json"
LEGACY_INTEGRITY = 1
"""Checksum over the weight files only: what a manifest without an ``integrity`` field was written with."""
INTEGRITY = 2
"""Checksum over the weight files and the manifest's content: what :meth:`Assessor.save` writes now."""
UNHASHED = frozenset({"files", "artifact_sha256"})
"""The manifest fields left out of its canonical content: ``files`` enters the checksum through the per-file
checksums (sorted by name, so its listing order does not matter) and ``artifact_sha256`` is the checksum."""


class ArtifactError(RuntimeError):
    """A model artifact that must not be loaded: missing files, wrong kind, or a checksum mismatch."""


class Manifest(BaseModel):
    format: Literal[1] = 1
    kind: str
    name: str
    version: int | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    code_version: str = Field(default_factory=lambda: code_version())
    consumes: Literal["matrix", "image"] = "matrix"
    settings: dict[str, Any] = Field(default_factory=dict)
    normalization: dict[str, Any] | None = None
    calibration: dict[str, Any] = Field(default_factory=dict)
    training_data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    runtime: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)  # file name → sha256
    integrity: Literal[1, 2] = INTEGRITY
    """How :attr:`weights_sha256` is defined; :meth:`read` takes a manifest without the field as version 1."""
    artifact_sha256: str | None = None
    """:attr:`weights_sha256` as :meth:`seal` computed it on saving, so that a manifest edited afterwards is
    refused even where no registry row is there to compare with (version 2 only)."""

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)  # atomic: a reader sees the old manifest or the new one, never half
        return path

    def seal(self) -> None:
        """Record :attr:`weights_sha256` in the manifest itself; call it last, once ``files`` is filled in."""
        self.artifact_sha256 = self.weights_sha256

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise ArtifactError(f"no {MANIFEST_FILE} in {directory}")
        try:
            manifest = cls.model_validate_json(path.read_text())
        except ValidationError as exc:
            raise ArtifactError(f"{path} is not a valid manifest: {exc}") from None
        if "integrity" not in manifest.model_fields_set:  # written before the field existed
            manifest.integrity = LEGACY_INTEGRITY
        return manifest

    def verify(
        self,
        directory: Path,
        weight_files: Collection[str],
        *,
        allow_legacy: bool = False,
        copy_to: Path | None = None,
    ) -> None:
        """Raise :class:`ArtifactError` unless the manifest lists exactly ``weight_files`` (the assessor's; a
        file left out of the list would otherwise go unchecked), its content is what it was when it was saved,
        and each weight file exists with its recorded checksum.

        A version 1 manifest has nothing to check its content against: an edited threshold would pass. It is
        refused unless ``allow_legacy``, which only a caller that also compares :attr:`weights_sha256` with the
        registry's checksum may pass. ``copy_to``: write each weight file there as it is hashed, so that the
        caller loads the very bytes that were checked, not a file that may have been swapped since."""
        self._check_file_list(Path(directory), weight_files)
        self._check_content(Path(directory) / MANIFEST_FILE, allow_legacy)
        for name, expected in self.files.items():
            _check_file(Path(directory) / name, expected, None if copy_to is None else Path(copy_to) / name)

    def _check_file_list(self, directory: Path, weight_files: Collection[str]) -> None:
        if set(self.files) != set(weight_files):
            missing = sorted(set(weight_files) - set(self.files))
            unexpected = sorted(set(self.files) - set(weight_files))
            raise ArtifactError(
                f"{directory / MANIFEST_FILE} lists the weight files {sorted(self.files)}, "
                f"a {self.kind!r} model has {sorted(weight_files)}"
                f" (not listed: {missing}, not expected: {unexpected})"
            )

    def _check_content(self, manifest_path: Path, allow_legacy: bool) -> None:
        if self.integrity < INTEGRITY:
            if not allow_legacy:
                raise ArtifactError(
                    f"{manifest_path} is of the old format (integrity version {self.integrity}): its checksum "
                    "covers the weight files only, so an edit to its threshold, normalization or settings would go "
                    "unnoticed. Only a load that also checks the registry's sha256 accepts it (allow_legacy=True); "
                    f"re-seal it by loading it that way and saving it again (integrity version {INTEGRITY}), then "
                    "register the new folder so that the registry records its new checksum"
                )
            return
        if self.artifact_sha256 != self.weights_sha256:
            raise ArtifactError(
                f"{manifest_path} was changed after it was saved: its content hashes to {self.weights_sha256[:12]}…, "
                f"its artifact_sha256 says {str(self.artifact_sha256)[:12]}…"
            )

    @property
    def weights_sha256(self) -> str:
        """One checksum for the whole artifact (what the ``models`` table records).

        Version 1: the weight files' names and checksums. Version 2 starts from a line naming the version
        (so the two definitions never coincide: a version 2 manifest rewritten to claim version 1 no longer
        matches its registry row) and adds :meth:`canonical_content`.
        """
        digest = hashlib.sha256()
        if self.integrity >= INTEGRITY:
            digest.update(f"coilguard manifest integrity {self.integrity}\n".encode())
        for name in sorted(self.files):
            digest.update(f"{name}:{self.files[name]}\n".encode())
        if self.integrity >= INTEGRITY:
            digest.update(self.canonical_content().encode())
        return digest.hexdigest()

    def canonical_content(self) -> str:
        """Every field but :data:`UNHASHED` as compact JSON with sorted keys: the same for the manifest in
        memory and as read back from disk, whatever the file's indentation or key order.

        Not only what decides predictions (kind, settings, normalization, calibration, the image classifiers'
        classes in ``training_data``) but the provenance too (name, version, created_at, code_version, data,
        metrics, runtime): nothing rewrites a manifest once it is saved, so no field may legitimately differ,
        and "which data and code made this model" is worth as much as the threshold years later.
        """
        content = json.loads(self.model_dump_json(exclude=set(UNHASHED)))  # the serialisation write() uses
        return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sha256_file(path: Path, copy_to: Path | None = None) -> str:
    """The file's sha256; with ``copy_to``, the bytes hashed are written there too (one read serves both)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh, _sink(copy_to) as out:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
    return digest.hexdigest()


def _sink(path: Path | None) -> AbstractContextManager[BinaryIO | None]:
    """A new file at ``path`` (never an existing one: "x"), or nothing to write to."""
    return open(path, "xb") if path is not None else nullcontext()


def _check_file(path: Path, expected: str, copy_to: Path | None) -> None:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    actual = sha256_file(path, copy_to)
    if actual != expected:
        raise ArtifactError(f"{path} does not match its manifest (sha256 {actual[:12]}…, expected {expected[:12]}…)")


@lru_cache(maxsize=1)
def code_version() -> str:
    """``coilguard <version> (<commit>; ml <digest>)``: what a manifest says produced the model.

    The commit comes from git in a checkout and from ``COILGUARD_COMMIT`` in an image (a build argument: the
    image holds no ``.git``, and its package version does not change with every build). The digest of the
    ``ml`` package's source says which training code it was even where neither is known."""
    try:
        version = metadata.version("coilguard")
    except metadata.PackageNotFoundError:
        version = "unknown"
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    commit = commit or os.environ.get("COILGUARD_COMMIT", "").strip()
    return f"coilguard {version} ({commit + '; ' if commit else ''}ml {_ml_source_digest()})"


def _ml_source_digest() -> str:
    return source_digest(Path(__file__).resolve().parents[1], length=12)  # the ml package


def source_digest(*packages: Path, length: int = 16) -> str:
    """A digest of the Python source under ``packages`` (each file's path from the package's parent, and its
    bytes): which code it was, where no commit says so."""
    digest = hashlib.sha256()
    for root in packages:
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{path.relative_to(root.parent)}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:length]
