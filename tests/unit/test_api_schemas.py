"""The API's request types refuse what the document does not promise, with a reason that says what it wants."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from services.api.schemas import UtcTime


def test_a_time_with_its_offset_is_read_as_utc() -> None:
    assert TypeAdapter(UtcTime).validate_python("2026-01-05T07:00:00+01:00").isoformat() == "2026-01-05T06:00:00+00:00"


@pytest.mark.parametrize("value", ["2026-01-05T06:00:00Z\n", "2026-01-05T06:00:00", "1767592800", 1767592800])
def test_anything_but_an_rfc3339_time_is_refused_saying_so(value: object) -> None:
    # re.match with "$" let a final "\n" past the check; pydantic then refused it with a parser's message
    with pytest.raises(ValidationError, match="expected an ISO 8601 time with its offset"):
        TypeAdapter(UtcTime).validate_python(value)
