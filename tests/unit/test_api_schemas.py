"""The API's request types refuse what the document does not promise, with a reason that says what it wants."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from services.api.schemas import FeedbackIn, UtcTime


def test_a_time_with_its_offset_is_read_as_utc() -> None:
    assert TypeAdapter(UtcTime).validate_python("2026-01-05T07:00:00+01:00").isoformat() == "2026-01-05T06:00:00+00:00"


@pytest.mark.parametrize("value", ["2026-01-05T06:00:00Z\n", "2026-01-05T06:00:00", "1767592800", 1767592800])
def test_anything_but_an_rfc3339_time_is_refused_saying_so(value: object) -> None:
    # re.match with "$" let a final "\n" past the check; pydantic then refused it with a parser's message
    with pytest.raises(ValidationError, match="expected an ISO 8601 time with its offset"):
        TypeAdapter(UtcTime).validate_python(value)


def _feedback(**fields: object) -> FeedbackIn:
    return FeedbackIn.model_validate({"coil_id": "C-1", "label": "OK", "operator": "anna", **fields})


@pytest.mark.parametrize("operator", ["", "   ", "\t", " \n "])
def test_a_blank_operator_is_refused_after_trimming(operator: str) -> None:
    # the length used to be checked before the trim: "   " passed and was stored as ""
    with pytest.raises(ValidationError, match="at least 1 character"):
        _feedback(operator=operator)


def test_an_operator_is_trimmed_before_its_length_is_checked() -> None:
    assert _feedback(operator="  anna  ").operator == "anna"
    assert _feedback(operator="a" * 128 + "  ").operator == "a" * 128
    with pytest.raises(ValidationError, match="at most 128 characters"):
        _feedback(operator="a" * 129)


@pytest.mark.parametrize(("field", "value"), [("operator", "a\x1b[2Jb"), ("comment", "x\x00")])
def test_control_characters_are_refused(field: str, value: str) -> None:
    with pytest.raises(ValidationError, match=r"control characters|visible characters"):
        _feedback(**{field: value})


@pytest.mark.parametrize("name", ["anna\n06:00 INFO forged", "anna\tben", "an\u200bna", "an\x85na", "an\u2028na"])
def test_an_operator_name_is_one_line_of_visible_characters(name: str) -> None:
    """A line break in a name forges a log line; an invisible character makes one person look like two."""
    with pytest.raises(ValidationError, match="one line of visible characters"):
        _feedback(operator=name)
    assert _feedback(operator="Zoë Ångström-Ørsted").operator == "Zoë Ångström-Ørsted"
    assert _feedback(comment="first line\nsecond line\tindented").comment == "first line\nsecond line\tindented"
