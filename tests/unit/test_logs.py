"""Log lines: fields a caller adds with ``extra=`` are shown, what a library adds for its own console is not."""

from __future__ import annotations

import json
import logging

from services.logs import JsonFormatter, TextFormatter


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Started server process [%d]", (42,), None)
    record.__dict__.update(extra)
    return record


def test_uvicorns_coloured_copy_of_its_message_stays_out_of_the_logs_a_field_of_ours_does_not() -> None:
    """uvicorn adds `color_message` (its message with terminal escapes) to its records: under `coilguard api` and
    `up` every text line ended in `color_message=Started server process [\\x1b[36m%d\\x1b[0m]`, every JSON line
    carried it as a field."""
    record = _record(color_message="Started server process [\x1b[36m%d\x1b[0m]", coil_id="C-1")
    text = TextFormatter().format(record)
    assert "Started server process [42]" in text and "coil_id=C-1" in text and "\x1b" not in text
    doc = json.loads(JsonFormatter().format(record))
    assert doc["msg"] == "Started server process [42]" and doc["coil_id"] == "C-1" and "color_message" not in doc
