"""Which report files ``GET /drift-reports/{id}/html`` serves: only files under REPORT_DIR."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.api.drift import _inside


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "drift").mkdir()
    (tmp_path / "drift" / "ok.html").write_text("<html>ok</html>")
    return tmp_path


def test_a_report_under_the_report_dir_is_served(root: Path) -> None:
    assert _inside(root, "drift/ok.html") == (root / "drift" / "ok.html").resolve()


@pytest.mark.parametrize("uri", ["../secret.txt", "/etc/passwd", "drift/../../secret.txt"])
def test_a_uri_outside_the_report_dir_is_not_served(root: Path, uri: str) -> None:
    assert _inside(root, uri) is None


def test_a_uri_with_a_nul_byte_is_not_served(root: Path) -> None:
    # SQLite keeps the NUL; the path calls raised "embedded null byte", a 500 instead of a 404
    assert _inside(root, "drift/ok.html\x00.png") is None
