"""CoilMessage v1: valid messages decode exactly; every kind of bad message is refused with a reason."""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ml.images import encode_png
from workflows.messages import (
    Decision,
    RejectedMessage,
    Rejection,
    Vote,
    dumps,
    encode_coil_message,
    parse_coil_message,
)

AT = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


@pytest.fixture
def matrix() -> np.ndarray:
    m = np.random.default_rng(1).normal(140, 4, (264, 18)).astype(np.float32)
    m[10, 3] = np.nan
    m[200, :] = np.nan
    return m


def _doc(matrix: np.ndarray, **changes: object) -> dict:
    doc = orjson.loads(encode_coil_message("C-2026-000123", "galv-1", AT, matrix, product={"coating": "Z275"}))
    doc.update(changes)
    return doc


@pytest.mark.parametrize("binary", [False, True])
def test_round_trip_keeps_every_reading_and_every_drop(matrix: np.ndarray, binary: bool) -> None:
    payload = encode_coil_message("C-2026-000123", "galv-1", AT, matrix, product={"coating": "Z275"}, binary=binary)
    msg = parse_coil_message(payload, topic_line="galv-1")
    assert msg.coil_id == "C-2026-000123" and msg.line == "galv-1" and msg.produced_at == AT
    assert msg.product is not None and msg.product.coating == "Z275"
    assert msg.thickness.dtype == np.float32 and msg.thickness.shape == (264, 18)
    np.testing.assert_array_equal(np.isnan(msg.thickness), np.isnan(matrix))
    np.testing.assert_array_equal(msg.thickness[~np.isnan(matrix)], matrix[~np.isnan(matrix)])


def test_nested_lists_write_null_for_dropped_readings(matrix: np.ndarray) -> None:
    doc = _doc(matrix)
    assert doc["thickness"][10][3] is None
    assert doc["produced_at"] == "2026-11-23T10:00:00Z"


def test_naive_timestamps_are_utc_and_product_is_optional(matrix: np.ndarray) -> None:
    doc = _doc(matrix, produced_at="2026-11-23T10:00:00")
    del doc["product"]
    msg = parse_coil_message(orjson.dumps(doc))
    assert msg.produced_at == AT and msg.product is None


def test_unknown_top_level_fields_are_ignored(matrix: np.ndarray) -> None:
    assert parse_coil_message(orjson.dumps(_doc(matrix, gateway="gw-7"))).coil_id == "C-2026-000123"


def test_unknown_image_fields_are_ignored(matrix: np.ndarray) -> None:
    """As at the top level: a camera gateway that adds a field of its own (which side, the exposure) must not
    have every coil it sends refused."""
    image = {**_image(PNG_B64), "side": "top", "exposure_ms": 4}
    assert parse_coil_message(orjson.dumps(_doc(matrix, images=[image]))).images[0].decode() == PNG


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PNG = encode_png(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
PNG_B64 = _b64(PNG)


def _jpeg(width: int = 8, height: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="JPEG")
    return buffer.getvalue()


JPEG_B64 = _b64(_jpeg())


def _image(data_b64: str, fmt: str = "png") -> dict[str, str]:
    return {"kind": "surface", "format": fmt, "data_b64": data_b64}


def _refusal(payload: bytes, **kwargs: object) -> RejectedMessage:
    with pytest.raises(RejectedMessage) as info:
        parse_coil_message(payload, **kwargs)
    assert info.value.reason
    return info.value


BAD_CASES = {
    "bad json": (lambda m: b'{"schema": 1, "coil_id": ', None),
    "not an object": (lambda m: b"[1, 2, 3]", None),
    "no matrix": (lambda m: orjson.dumps({k: v for k, v in _doc(m).items() if k != "thickness"}), "thickness"),
    "both matrices": (lambda m: orjson.dumps(_doc(m, thickness_b64="AAAA")), "thickness"),
    "too few rows": (lambda m: orjson.dumps(_doc(m, thickness=[[1.0] * 18] * 263)), "thickness"),
    "ragged row": (lambda m: orjson.dumps(_doc(m, thickness=[[1.0] * 18] * 263 + [[1.0] * 17])), "thickness"),
    "row not a list": (lambda m: orjson.dumps(_doc(m, thickness=[[1.0] * 18] * 263 + ["x" * 18])), "thickness"),
    "string reading": (lambda m: orjson.dumps(_doc(m, thickness=[["1.5"] * 18] * 264)), "thickness"),
    "boolean reading": (lambda m: orjson.dumps(_doc(m, thickness=[[True] * 18] * 264)), "thickness"),
    "nested too deep": (lambda m: orjson.dumps(_doc(m, thickness=[[[1.0]] * 18] * 264)), "thickness"),
    "all dropped": (lambda m: orjson.dumps(_doc(m, thickness=[[None] * 18] * 264)), "thickness"),
    "infinite b64": (
        lambda m: orjson.dumps(
            {
                **{k: v for k, v in _doc(m).items() if k != "thickness"},
                "thickness_b64": base64.b64encode(np.full((264, 18), np.inf, "<f4").tobytes()).decode(),
            }
        ),
        "thickness_b64",
    ),
    "b64 wrong length": (
        lambda m: orjson.dumps({**{k: v for k, v in _doc(m).items() if k != "thickness"}, "thickness_b64": "AAAAAAAA"}),
        "thickness_b64",
    ),
    "b64 garbage": (
        lambda m: orjson.dumps({**{k: v for k, v in _doc(m).items() if k != "thickness"}, "thickness_b64": "!!"}),
        "thickness_b64",
    ),
    "bad coil id": (lambda m: orjson.dumps(_doc(m, coil_id="C 1/2")), "coil_id"),
    "long coil id": (lambda m: orjson.dumps(_doc(m, coil_id="C" * 65)), "coil_id"),
    "missing coil id": (lambda m: orjson.dumps({k: v for k, v in _doc(m).items() if k != "coil_id"}), "coil_id"),
    "coil id a number": (lambda m: orjson.dumps(_doc(m, coil_id=123)), "coil_id"),
    "wrong schema": (lambda m: orjson.dumps(_doc(m, schema=2)), "schema"),
    "bad timestamp": (lambda m: orjson.dumps(_doc(m, produced_at="yesterday")), "produced_at"),
    "bad product": (lambda m: orjson.dumps(_doc(m, product={"width_mm": -5})), "product.width_mm"),
    # only the JSON types the contract names: pydantic's lax mode would read these as something else
    "schema true": (lambda m: orjson.dumps(_doc(m, schema=True)), "schema"),
    "schema a float": (lambda m: orjson.dumps(_doc(m, schema=1.0)), "schema"),
    "schema a string": (lambda m: orjson.dumps(_doc(m, schema="1")), "schema"),
    "width a string": (lambda m: orjson.dumps(_doc(m, product={"width_mm": "1250"})), "product.width_mm"),
    "thickness a boolean": (lambda m: orjson.dumps(_doc(m, product={"thickness_mm": True})), "product.thickness_mm"),
    "time a number": (lambda m: orjson.dumps(_doc(m, produced_at=1795428000)), "produced_at"),
    "time a numeric string": (lambda m: orjson.dumps(_doc(m, produced_at="1795428000")), "produced_at"),
    "time without a time": (lambda m: orjson.dumps(_doc(m, produced_at="2026-11-23")), "produced_at"),
    "time past year 9999 in UTC": (
        lambda m: orjson.dumps(_doc(m, produced_at="9999-12-31T23:30:00-01:00")),
        "produced_at",
    ),
    "time before year 1 in UTC": (
        lambda m: orjson.dumps(_doc(m, produced_at="0001-01-01T00:30:00+01:00")),
        "produced_at",
    ),
    # images are refused while parsing, whether or not an image assessor is active to decode them
    "image not base64": (lambda m: orjson.dumps(_doc(m, images=[_image("!!!!")])), "images.0.data_b64"),
    "image base64 with a newline": (
        lambda m: orjson.dumps(_doc(m, images=[_image(PNG_B64 + "\n")])),
        "images.0.data_b64",
    ),
    "image not an image": (lambda m: orjson.dumps(_doc(m, images=[_image(_b64(b"hello"))])), "images.0.data_b64"),
    "jpeg sent as png": (lambda m: orjson.dumps(_doc(m, images=[_image(JPEG_B64)])), "images.0.data_b64"),
    "png sent as jpeg": (lambda m: orjson.dumps(_doc(m, images=[_image(PNG_B64, "jpeg")])), "images.0.data_b64"),
    "image format unknown": (lambda m: orjson.dumps(_doc(m, images=[_image(PNG_B64, "gif")])), "images.0.format"),
    "second image bad": (
        lambda m: orjson.dumps(_doc(m, images=[_image(PNG_B64), _image(PNG_B64[4:])])),
        "images.1.data_b64",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_every_bad_message_names_its_reason_and_field(matrix: np.ndarray, case: str) -> None:
    make, field = BAD_CASES[case]
    error = _refusal(make(matrix))
    assert error.field == field, (case, error.field, error.reason)


@pytest.mark.parametrize("coil_id", ["C-1\n", "C" * 64 + "\n", "\nC-1", "C-1\r\n"])
def test_a_coil_id_with_a_line_break_is_refused(matrix: np.ndarray, coil_id: str) -> None:
    # re.match with "$" let a final "\n" through; an id with a line break splits log lines and SQL keys
    error = _refusal(orjson.dumps(_doc(matrix, coil_id=coil_id)))
    assert error.field == "coil_id" and "[A-Za-z0-9._-]" in error.reason


@pytest.mark.parametrize("line", ["galv-1\n", "galv/1", "galv+", "#", "", "L" * 65, "galv\x00", "galv\x85"])
def test_a_line_that_cannot_be_one_topic_level_is_refused(matrix: np.ndarray, line: str) -> None:
    """The line becomes a level of decisions/{line}: a separator, a wildcard or a control character in it would
    publish elsewhere or nowhere; 64 characters is the column's width."""
    error = _refusal(orjson.dumps(_doc(matrix, line=line)))
    assert error.field == "line" and "none of them / + #" in error.reason, error.reason


@pytest.mark.parametrize("line", ["Linie-Ä", "galv 1", "L" * 64, "冷轧-3"])
def test_a_line_may_be_named_as_the_plant_names_it(matrix: np.ndarray, line: str) -> None:
    """DESIGN restricts the coil id, not the line: a gateway naming its line "Linie-Ä" must not have every coil
    refused."""
    assert parse_coil_message(orjson.dumps(_doc(matrix, line=line)), topic_line=line).line == line


def test_a_refusal_names_no_coil_id_that_could_not_be_a_coil(matrix: np.ndarray) -> None:
    """The rejection's coil_id is what tools join to ``coils``: a malformed or 100 kB id is not echoed back."""
    for coil_id in ("C 1", "C" * 100_000, "C-1\n"):
        assert _refusal(orjson.dumps(_doc(matrix, coil_id=coil_id))).coil_id is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"schema": 2}, "schema"), ({"coil_id": None}, "coil_id"), ({"produced_at": "yesterday"}, "produced_at")],
)
def test_the_envelope_is_judged_before_the_matrix(matrix: np.ndarray, changes: dict, field: str) -> None:
    """A message of another schema, or without an id, is refused for that, not for a matrix it may well lay out
    differently: tools sort rejections by ``field``."""
    assert _refusal(orjson.dumps(_doc(matrix, thickness=[[1.0] * 18] * 3, **changes))).field == field


def test_a_number_beyond_float32_is_not_called_infinite(matrix: np.ndarray) -> None:
    doc = orjson.loads(encode_coil_message("C-1", "galv-1", AT, matrix))
    doc["thickness"][3][5] = 1e39  # finite in JSON, infinite once float32
    error = _refusal(orjson.dumps(doc))
    assert error.field == "thickness" and error.reason == (
        "value at section 3, sensor 5 is beyond float32's range (±3.4e+38)"
    )


def test_images_null_is_no_images_and_the_format_is_read_in_any_case(matrix: np.ndarray) -> None:
    assert parse_coil_message(orjson.dumps(_doc(matrix, images=None))).images == []
    image = parse_coil_message(orjson.dumps(_doc(matrix, images=[_image(PNG_B64, "PNG")]))).images[0]
    assert image.format == "png"
    upper = {**_image(PNG_B64), "kind": "Surface"}
    assert parse_coil_message(orjson.dumps(_doc(matrix, images=[upper]))).images[0].kind == "surface"


def test_product_numbers_may_be_integers_or_decimals(matrix: np.ndarray) -> None:
    product = {"coating": "Z275", "width_mm": 1250, "thickness_mm": 0.8}
    msg = parse_coil_message(orjson.dumps(_doc(matrix, product=product)))
    assert msg.product is not None and (msg.product.width_mm, msg.product.thickness_mm) == (1250, 0.8)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"schema": True}, "must be the integer 1 (CoilMessage v1), got true"),
        ({"schema": 2}, "must be the integer 1 (CoilMessage v1), got 2"),
        ({"coil_id": "C 1"}, "must be 1–64 characters of [A-Za-z0-9._-]"),
        ({"produced_at": 1795428000}, "must be an ISO 8601 date and time"),
    ],
)
def test_a_refusal_says_what_the_field_must_be(matrix: np.ndarray, changes: dict, words: str) -> None:
    # the reason goes out on the rejected topic as it is: no pydantic "Value error, " prefix
    assert _refusal(orjson.dumps(_doc(matrix, **changes))).reason.startswith(words)


@pytest.mark.parametrize(("fmt", "data_b64"), [("png", PNG_B64), ("jpeg", JPEG_B64), ("jpg", JPEG_B64)])
def test_images_are_decoded_once_while_parsing(
    matrix: np.ndarray, fmt: str, data_b64: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = orjson.dumps(_doc(matrix, images=[_image(data_b64, fmt)]))
    decoded: list[str] = []
    b64decode = base64.b64decode
    monkeypatch.setattr(base64, "b64decode", lambda s, **kw: decoded.append(s) or b64decode(s, **kw))
    image = parse_coil_message(payload).images[0]
    assert image.decode() == base64.b64decode(data_b64) and image.decode() is image.decode()
    assert decoded == [data_b64, data_b64]  # once by the parser, once by this test


@pytest.mark.parametrize(
    ("image", "words"),
    [
        (_image("!!!!"), "not valid base64"),
        (_image(_b64(b"hello")), "not a PNG image"),
        (_image(PNG_B64, "jpg"), "not a JPEG image"),
        (_image(_b64(b"\x89PNG\r\n\x1a\n" + bytes(40))), "not a readable image"),  # a PNG's signature, nothing more
        ({"kind": "surface", "format": "png", "data": PNG_B64}, "Field required"),  # misspelt: data_b64 missing
    ],
)
def test_a_bad_image_says_what_is_wrong(matrix: np.ndarray, image: dict, words: str) -> None:
    assert _refusal(orjson.dumps(_doc(matrix, images=[image]))).reason.startswith(words)


def test_infinity_in_json_is_refused(matrix: np.ndarray) -> None:
    text = encode_coil_message("C-1", "galv-1", AT, matrix).replace(b"[[", b"[[1e999,", 1)
    _refusal(text)


def test_oversize_payload_is_refused_before_parsing() -> None:
    error = _refusal(b" " * 2048, max_bytes=1024)
    assert "exceeds" in error.reason


def test_line_must_match_the_topic(matrix: np.ndarray) -> None:
    error = _refusal(encode_coil_message("C-1", "galv-1", AT, matrix), topic_line="galv-2")
    assert error.field == "line" and error.coil_id == "C-1"


def test_refusal_keeps_the_coil_id_when_it_was_readable(matrix: np.ndarray) -> None:
    error = _refusal(orjson.dumps(_doc(matrix, thickness=[[1.0] * 18] * 3)))
    assert error.coil_id == "C-2026-000123"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000) | st.text(max_size=500).map(str.encode))
def test_arbitrary_bytes_are_refused_never_crash(payload: bytes) -> None:
    with pytest.raises(RejectedMessage):
        parse_coil_message(payload)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["schema", "coil_id", "line", "produced_at", "thickness", "thickness_b64", "product"]),
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats()
        | st.text(max_size=20)
        | st.lists(st.integers(0, 1000)),
    )
)
def test_arbitrary_envelopes_are_refused_never_crash(doc: dict) -> None:
    with pytest.raises(RejectedMessage):
        parse_coil_message(orjson.dumps(doc))


def test_outgoing_payloads_follow_design() -> None:
    decision = Decision(
        coil_id="C-1",
        line="galv-1",
        decision="NOK",
        p_nok=0.8,
        confidence=0.6,
        votes=[Vote(model="cnn", version=3, label="NOK", p_nok=0.8, confidence=0.6)],
        decided_at=AT,
        latency_ms=12.5,
    )
    doc = orjson.loads(dumps(decision))
    assert set(doc) == {"coil_id", "line", "decision", "p_nok", "confidence", "votes", "decided_at", "latency_ms"}
    assert set(doc["votes"][0]) == {"model", "version", "label", "p_nok", "confidence"}
    rejection = Rejection.of(RejectedMessage("invalid JSON: x"), b"{garbage", AT)
    assert orjson.loads(dumps(rejection)) == {
        "reason": "invalid JSON: x",
        "received_at": "2026-11-23T10:00:00Z",
        "excerpt": "{garbage",
    }
