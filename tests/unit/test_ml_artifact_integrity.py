"""Loading a saved assessor on its own (no registry row to compare with): a manifest of the old integrity format
is refused unless the caller opts in, and the weights used are the bytes that were checked."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import as_written_by_release_1, edit_manifest, stripe_coils

from ml.assessors.base import AssessBatch, Assessor
from ml.assessors.manifest import ArtifactError, Manifest
from ml.assessors.registry import create, load_artifact

COILS = stripe_coils(20, seed=5).X


def _trained(seed: int) -> Assessor:
    cnn = create("cnn", {"epochs": 1, "batch_size": 32, "seed": seed}, name="tiny")
    cnn.fit(stripe_coils(80), device="cpu")
    return cnn


@pytest.fixture(scope="module")
def tiny() -> Assessor:
    return _trained(3)


@pytest.fixture(scope="module")
def other() -> Assessor:
    return _trained(4)


def _p_nok(assessor: Assessor) -> np.ndarray:
    return assessor.predict(AssessBatch(COILS))[0]


def _claims_integrity_1(content: dict[str, Any]) -> None:
    content["integrity"] = 1


def _higher_threshold(content: dict[str, Any]) -> None:
    content["calibration"]["threshold"] = 0.999


def _wider_normalization(content: dict[str, Any]) -> None:
    content["normalization"]["high"] *= 3


DOWNGRADES = [as_written_by_release_1, _claims_integrity_1]
OLD_FORMAT = r"manifest\.json is of the old format \(integrity version 1\).*allow_legacy=True.*re-seal it"


@pytest.mark.parametrize("downgrade", DOWNGRADES)
@pytest.mark.parametrize("edit", [_higher_threshold, _wider_normalization])
def test_a_manifest_edited_under_the_old_format_is_refused_by_a_plain_load(
    tiny: Assessor, downgrade: Callable, edit: Callable, tmp_path: Path
) -> None:
    """The old format's checksum covers the weight files only: claiming it once let an edited threshold or
    normalization through :meth:`Assessor.load`, whatever its docstring promised."""
    tiny.save(tmp_path)
    edit_manifest(tmp_path, downgrade)
    edit_manifest(tmp_path, edit)
    with pytest.raises(ArtifactError, match=OLD_FORMAT):
        load_artifact(tmp_path)
    with pytest.raises(ArtifactError, match=OLD_FORMAT):
        type(tiny).load(tmp_path)


def test_an_old_format_model_loads_where_the_caller_opts_in_and_can_be_resealed(tiny: Assessor, tmp_path: Path) -> None:
    """A model saved by an older release: refused by a plain load, loaded by a caller that checks the registry's
    checksum as well, and sealed anew by saving it again."""
    tiny.save(tmp_path / "old")
    edit_manifest(tmp_path / "old", as_written_by_release_1)
    with pytest.raises(ArtifactError, match=OLD_FORMAT):
        load_artifact(tmp_path / "old")
    legacy = load_artifact(tmp_path / "old", allow_legacy=True)
    np.testing.assert_array_equal(_p_nok(legacy), _p_nok(tiny))
    assert legacy.save(tmp_path / "resealed").integrity == 2
    np.testing.assert_array_equal(_p_nok(load_artifact(tmp_path / "resealed")), _p_nok(tiny))


def test_the_weights_loaded_are_the_bytes_that_were_checked(
    tiny: Assessor, other: Assessor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A weights file swapped after its checksum was checked (another model's, valid on its own) is not used."""
    tiny.save(tmp_path / "tiny")
    other.save(tmp_path / "other")
    assert not np.array_equal(_p_nok(tiny), _p_nok(other))
    verify = Manifest.verify

    def verify_then_swap(self: Manifest, directory: Path, *args: Any, **kwargs: Any) -> None:
        verify(self, directory, *args, **kwargs)
        shutil.copyfile(tmp_path / "other" / "weights.pt", Path(directory) / "weights.pt")

    monkeypatch.setattr(Manifest, "verify", verify_then_swap)
    loaded = load_artifact(tmp_path / "tiny")
    np.testing.assert_array_equal(_p_nok(loaded), _p_nok(tiny))


def test_a_load_leaves_no_copy_of_the_weights_behind(
    tiny: Assessor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copies: list[Path] = []
    verify = Manifest.verify

    def verify_and_note_the_copy(self: Manifest, *args: Any, copy_to: Path | None = None, **kwargs: Any) -> None:
        verify(self, *args, copy_to=copy_to, **kwargs)
        assert copy_to is not None and (copy_to / "weights.pt").is_file()
        copies.append(copy_to)

    monkeypatch.setattr(Manifest, "verify", verify_and_note_the_copy)
    tiny.save(tmp_path)
    load_artifact(tmp_path)
    assert len(copies) == 1 and not copies[0].exists()


def test_an_image_without_git_names_its_build_commit_and_the_training_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a container there is no .git and the package version never changes: the manifest's code version comes
    from the COILGUARD_COMMIT build argument, and a digest of ml/ tells two builds of one commit apart."""
    import subprocess

    from ml.assessors import manifest

    def no_git(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.setenv("COILGUARD_COMMIT", "0123abcd4567")
    manifest.code_version.cache_clear()
    try:
        version = manifest.code_version()
    finally:
        manifest.code_version.cache_clear()
    assert version.startswith("coilguard ") and "(0123abcd4567; ml " in version
    assert version.endswith(f"ml {manifest._ml_source_digest()})") and len(manifest._ml_source_digest()) == 12
