"""The manifest written beside every model's weights: what produced the model, and proof it is intact.

A plant must be able to answer "which data, which code, which settings made the model that called
this coil NOK?" years later, and must never serve a weights file that was altered or half-written.
"""

from __future__ import annotations

import hashlib
import subprocess
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

MANIFEST_FILE = "manifest.json"


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

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)  # atomic: a reader sees the old manifest or the new one, never half
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise ArtifactError(f"no {MANIFEST_FILE} in {directory}")
        return cls.model_validate_json(path.read_text())

    def verify(self, directory: Path) -> None:
        """Raise :class:`ArtifactError` unless every listed file exists with its recorded checksum."""
        if not self.files:
            raise ArtifactError(f"manifest in {directory} lists no weight files")
        for name, expected in self.files.items():
            path = Path(directory) / name
            if not path.is_file():
                raise ArtifactError(f"{path} is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise ArtifactError(
                    f"{path} does not match its manifest (sha256 {actual[:12]}…, expected {expected[:12]}…)"
                )

    @property
    def weights_sha256(self) -> str:
        """One checksum for the whole artifact (what the `models` table records)."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(f"{name}:{self.files[name]}\n".encode())
        return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """``coilguard <version>`` plus the git commit (and ``-dirty``) when running from a checkout."""
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
    return f"coilguard {version}" + (f" ({commit})" if commit else "")
