"""Page cursors of ``GET /coils``: what the API hands out reads back; anything else is a 400, never a 500."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.api.queries import BadCursor, decode_cursor, encode_cursor


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def test_a_cursor_reads_back_in_utc() -> None:
    at = datetime(2026, 1, 5, 7, tzinfo=timezone(timedelta(hours=1)))
    assert decode_cursor(encode_cursor(at, "C-1")) == (datetime(2026, 1, 5, 6, tzinfo=UTC), "C-1")
    when, _ = decode_cursor(_b64("2026-01-05T07:00:00+01:00|C-1"))
    assert when.utcoffset() == timedelta(0) and when == at


@pytest.mark.parametrize(
    "raw",
    [
        "0001-01-01T00:00:00+05:00|C-1",  # before year 1 in UTC: OverflowError when bound, a 500
        "9999-12-31T23:00:00-05:00|C-1",  # after year 9999 in UTC
        "2026-01-05T06:00:00|C-1",  # no offset
        "2026-01-05T06:00:00+00:00|C 1",  # not a coil id
        "2026-01-05T06:00:00+00:00",  # no coil id at all
    ],
)
def test_a_forged_cursor_is_a_bad_cursor(raw: str) -> None:
    with pytest.raises(BadCursor, match="not a cursor from this API"):
        decode_cursor(_b64(raw))


def test_a_cursor_that_is_not_base64_is_a_bad_cursor() -> None:
    with pytest.raises(BadCursor):
        decode_cursor("!!!!")
