"""The MQTT message contract of DESIGN §3: CoilMessage v1 in, decisions, rejections and model events out.

Parsing is on the hot path of AssessCoils (hundreds of coils a second on two cores), so the matrix is
never validated number by number in Python: orjson parses, numpy converts, and one pass over the
element types catches strings and booleans that numpy would otherwise coerce silently. Every refusal
is a :class:`RejectedMessage` with a reason and the offending field, which the worker publishes on the
rejected topic.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from itertools import chain
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ml.images import OVER_PIL_LIMIT, image_size
from ml.matrix import MATRIX_BYTES, N_SECTIONS, N_SENSORS, SHAPE

SCHEMA_VERSION = 1
MAX_PAYLOAD_BYTES = 1 << 20
# Applied with fullmatch: under re.match a "$" also matches before a final newline, which let "C-1\n" through.
COIL_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A line is a topic level (sensors/{line}/matrix, decisions/{line}): whatever MQTT allows there but the wildcards
# and the separator, and no control characters; 64 at most, the column's width. "Linie-Ä" and "galv 1" are lines.
LINE_PATTERN = re.compile(r"[^\x00-\x1f\x7f-\x9f/+#]{1,64}")  # C0, DEL and C1 controls
LINE_RULE = "1–64 characters, none of them / + # or a control character"
SURFACE = "surface"  # the kind of image the image assessors judge (DESIGN §3)
_DATE_AND_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")  # a prefix: pydantic's parser checks the rest
_NUMBER_TYPES = frozenset({float, int, type(None)})


class RejectedMessage(ValueError):
    """A message that cannot be assessed; ``reason`` is for people, ``field`` for tools."""

    def __init__(self, reason: str, field: str | None = None, coil_id: str | None = None) -> None:
        super().__init__(reason if field is None else f"{field}: {reason}")
        self.reason = reason
        self.field = field
        self.coil_id = coil_id


class Product(BaseModel):
    """Strict numbers: lax mode would read "1250" and ``true`` as millimetres, which the contract never sends."""

    model_config = ConfigDict(extra="allow")

    coating: str | None = Field(None, max_length=32)
    width_mm: float | None = Field(None, gt=0, lt=5000, strict=True)
    thickness_mm: float | None = Field(None, gt=0, lt=20, strict=True)


# What a file of each declared format starts with; checking it costs nothing beside the base64 decode.
_SIGNATURES = {
    "png": (b"\x89PNG\r\n\x1a\n", "PNG"),
    "jpeg": (b"\xff\xd8\xff", "JPEG"),
    "jpg": (b"\xff\xd8\xff", "JPEG"),
}


class SurfaceImage(BaseModel):
    """One of a CoilMessage's ``images`` (DESIGN §3), checked while parsing so that a malformed image is
    refused whatever models are active, not only when an image assessor happens to decode it. The base64
    is decoded once, here: ``data`` keeps the file's bytes for the assessors."""

    model_config = ConfigDict(extra="ignore")  # as the envelope: a gateway adding a field must not stop the line

    kind: str = Field(SURFACE, max_length=32)  # another kind is checked but not judged: no assessor knows it
    format: Literal["png", "jpeg", "jpg"] = "png"
    data: bytes = Field(alias="data_b64", repr=False)
    _size: tuple[int, int] | None = PrivateAttr(None)

    @field_validator("format", "kind", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        """Read in any case, "PNG" as "png" and "Surface" as "surface": as a camera's SDK may spell them."""
        return value.lower() if isinstance(value, str) else value

    @field_validator("data", mode="before")
    @classmethod
    def _base64(cls, value: object) -> bytes:
        if not isinstance(value, str):
            raise ValueError(f"must be a base64 string, got {_show(value)}")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None

    @field_validator("data")
    @classmethod
    def _of_its_format(cls, value: bytes, info: ValidationInfo) -> bytes:
        fmt = info.data.get("format")  # absent when the format itself was refused
        if fmt in _SIGNATURES and not value.startswith(_SIGNATURES[fmt][0]):
            raise ValueError(f"not a {_SIGNATURES[fmt][1]} image, as its format {fmt!r} says")
        return value

    @model_validator(mode="after")
    def _read_size(self) -> SurfaceImage:
        self._size = image_size(self.data)
        return self

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height), read from the header: what decoding it would cost is known before it is decoded;
        None for an image over what PIL opens at all."""
        return self._size

    @property
    def pixels(self) -> int:
        return self._size[0] * self._size[1] if self._size is not None else OVER_PIL_LIMIT

    def decode(self) -> bytes:
        """The image file's bytes (PNG or JPEG, as ``format`` says)."""
        return self.data


class _Envelope(BaseModel):
    """Everything in a CoilMessage but the matrix, which is handled by numpy."""

    model_config = ConfigDict(extra="ignore")  # a gateway adding a field must not stop the line

    schema_: Literal[1] = Field(alias="schema")
    coil_id: str
    # pydantic applies ``pattern`` with the Rust regex engine, whose "$" is the end of the text only
    line: str
    produced_at: datetime
    product: Product | None = None
    images: list[SurfaceImage] = Field(default_factory=list, max_length=16)

    @field_validator("images", mode="before")
    @classmethod
    def _no_images(cls, value: object) -> object:
        """``null`` is no images, as ``product: null`` is no product."""
        return [] if value is None else value

    @field_validator("schema_", mode="before")
    @classmethod
    def _schema(cls, value: object) -> object:
        """Only the JSON integer 1: ``Literal[1]`` alone lets lax mode take ``true`` and ``1.0`` for it."""
        if type(value) is not int or value != SCHEMA_VERSION:
            raise ValueError(f"must be the integer {SCHEMA_VERSION} (CoilMessage v1), got {_show(value)}")
        return value

    @field_validator("coil_id")
    @classmethod
    def _coil_id(cls, value: str) -> str:
        if not COIL_ID_PATTERN.fullmatch(value):
            raise ValueError("must be 1–64 characters of [A-Za-z0-9._-]")
        return value

    @field_validator("line")
    @classmethod
    def _line(cls, value: str) -> str:
        if not LINE_PATTERN.fullmatch(value):
            raise ValueError(f"must be {LINE_RULE}, got {_show(value)}")
        return value

    @field_validator("produced_at", mode="before")
    @classmethod
    def _date_and_time(cls, value: object) -> object:
        """A date and a time as text: lax mode would read a number (or digits) as seconds since 1970, so a
        gateway sending milliseconds would date its coils tens of thousands of years ahead, and a bare date
        as midnight."""
        if not isinstance(value, str) or not _DATE_AND_TIME.match(value):
            raise ValueError(f"must be an ISO 8601 date and time, e.g. 2026-11-23T10:00:00Z, got {_show(value)}")
        return value

    @field_validator("produced_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        try:
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        except OverflowError:  # 9999-12-31T23:30:00-01:00 is in year 10000 in UTC
            raise ValueError(f"{value.isoformat()} is out of range once converted to UTC") from None


class CoilMessage(BaseModel):
    """A parsed, valid CoilMessage v1: the matrix as float32 (264, 18) with NaN for dropped readings."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    coil_id: str
    line: str
    produced_at: datetime
    thickness: np.ndarray
    product: Product | None = None
    images: list[SurfaceImage] = Field(default_factory=list)


def parse_coil_message(
    payload: bytes | str,
    *,
    topic_line: str | None = None,
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> CoilMessage:
    """Decode and validate one CoilMessage v1, or raise :class:`RejectedMessage` saying why."""
    if isinstance(payload, str):
        payload = payload.encode()
    if len(payload) > max_bytes:
        raise RejectedMessage(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise RejectedMessage(f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RejectedMessage(f"expected a JSON object, got {type(doc).__name__}")
    coil_id = _valid_id(doc.get("coil_id"))  # a rejection names only an id that could be a coil's
    has_list, has_b64 = "thickness" in doc, "thickness_b64" in doc
    lists, b64 = doc.pop("thickness", None), doc.pop("thickness_b64", None)

    # the envelope first: a message of another schema, or without an id, is refused for that, whatever its matrix
    try:
        envelope = _Envelope.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        if field == "schema_":
            field = "schema"
        # our validators' words go out on the rejected topic as they are, without pydantic's prefix
        raise RejectedMessage(err["msg"].removeprefix("Value error, "), field, coil_id) from None
    if topic_line is not None and envelope.line != topic_line:
        raise RejectedMessage(f"line {envelope.line!r} differs from the topic's {topic_line!r}", "line", coil_id)
    if has_list == has_b64:
        raise RejectedMessage("exactly one of thickness and thickness_b64 is required", "thickness", coil_id)
    matrix = _matrix_from_lists(lists, coil_id) if has_list else _matrix_from_b64(b64, coil_id)
    if np.isnan(matrix).all():
        raise RejectedMessage("every reading is dropped (null)", "thickness", coil_id)
    return CoilMessage(
        coil_id=envelope.coil_id,
        line=envelope.line,
        produced_at=envelope.produced_at,
        thickness=matrix,
        product=envelope.product,
        images=envelope.images,
    )


def coil_id_of(payload: bytes) -> str | None:
    """The coil id of a message refused after it parsed (it broke the ensemble), for the rejection."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return _valid_id(doc.get("coil_id")) if isinstance(doc, dict) else None


def _valid_id(value: object) -> str | None:
    return value if isinstance(value, str) and COIL_ID_PATTERN.fullmatch(value) else None


def _show(value: object, limit: int = 40) -> str:
    """A refused value as JSON, cut short: enough for a reason, never the whole payload."""
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _matrix_from_lists(rows: Any, coil_id: str | None) -> np.ndarray:
    if not isinstance(rows, list) or len(rows) != N_SECTIONS:
        got = f"{len(rows)} rows" if isinstance(rows, list) else type(rows).__name__
        raise RejectedMessage(f"must be {N_SECTIONS} rows of {N_SENSORS} numbers, got {got}", "thickness", coil_id)
    if not all(type(row) is list for row in rows):
        raise RejectedMessage("every row must be a list of numbers", "thickness", coil_id)
    widths = set(map(len, rows))
    if widths != {N_SENSORS}:
        raise RejectedMessage(
            f"every row must hold {N_SENSORS} numbers, found rows of {sorted(widths)}", "thickness", coil_id
        )
    types = set(map(type, chain.from_iterable(rows)))
    if not types <= _NUMBER_TYPES:
        bad = sorted(t.__name__ for t in types - _NUMBER_TYPES)
        raise RejectedMessage(f"readings must be numbers or null, found {', '.join(bad)}", "thickness", coil_id)
    with np.errstate(over="ignore"):  # a number beyond float32 becomes inf, refused below with its place
        matrix = np.array(rows, dtype=np.float32)  # null → NaN
    # JSON has no infinity (orjson refuses 1e400): one here is a finite number beyond float32's range
    return _finite_or_nan(matrix, coil_id, "thickness", f"beyond float32's range (±{np.finfo(np.float32).max:.3g})")


def _matrix_from_b64(data: Any, coil_id: str | None) -> np.ndarray:
    if not isinstance(data, str):
        raise RejectedMessage("must be a base64 string", "thickness_b64", coil_id)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RejectedMessage("not valid base64", "thickness_b64", coil_id) from None
    if len(raw) != MATRIX_BYTES:
        raise RejectedMessage(
            f"must decode to {MATRIX_BYTES} bytes ({N_SECTIONS}×{N_SENSORS} float32), got {len(raw)}",
            "thickness_b64",
            coil_id,
        )
    matrix = np.frombuffer(raw, dtype="<f4").reshape(SHAPE).astype(np.float32)
    return _finite_or_nan(matrix, coil_id, "thickness_b64")


def _finite_or_nan(matrix: np.ndarray, coil_id: str | None, field: str, what: str = "infinite") -> np.ndarray:
    if np.isinf(matrix).any():
        row, col = np.argwhere(np.isinf(matrix))[0]
        raise RejectedMessage(f"value at section {row}, sensor {col} is {what}", field, coil_id)
    return matrix


def encode_coil_message(
    coil_id: str,
    line: str,
    produced_at: datetime,
    thickness: np.ndarray,
    *,
    product: dict[str, Any] | None = None,
    images: list[dict[str, str]] | None = None,
    binary: bool = False,
) -> bytes:
    """The JSON a sensor gateway publishes; ``binary`` sends ``thickness_b64`` instead of nested lists."""
    matrix = np.asarray(thickness, dtype=np.float32)
    if matrix.shape != SHAPE:
        raise ValueError(f"thickness must be {SHAPE}, got {matrix.shape}")
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "coil_id": coil_id,
        "line": line,
        "produced_at": _iso(produced_at),
    }
    if product is not None:
        doc["product"] = product
    if binary:
        doc["thickness_b64"] = base64.b64encode(matrix.astype("<f4").tobytes()).decode()
    else:
        doc["thickness"] = matrix  # orjson writes NaN as null
    if images:
        doc["images"] = images
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


# ----------------------------------------------------------------------------- outgoing payloads


class Vote(BaseModel):
    model: str
    version: int
    label: Literal["OK", "NOK", "ABSTAIN"]
    p_nok: float | None
    confidence: float | None


class Decision(BaseModel):
    coil_id: str
    line: str
    decision: Literal["OK", "NOK"]
    p_nok: float
    confidence: float
    votes: list[Vote]
    decided_at: datetime
    latency_ms: float


class Rejection(BaseModel):
    reason: str
    field: str | None = None
    coil_id: str | None = None
    received_at: datetime
    excerpt: str

    @classmethod
    def of(cls, error: RejectedMessage, payload: bytes, received_at: datetime | None = None) -> Rejection:
        return cls(
            reason=error.reason,
            field=error.field,
            coil_id=error.coil_id,
            received_at=received_at or datetime.now(UTC),
            excerpt=payload[:200].decode("utf-8", errors="replace"),
        )


ModelEventKind = Literal["promoted", "retired"]


class ModelEvent(BaseModel):
    event: ModelEventKind
    model: str
    version: int
    at: datetime


def dumps(message: BaseModel) -> bytes:
    """Serialize an outgoing payload without ``null`` members (``field?`` in DESIGN §3 means optional)."""
    return orjson.dumps(message.model_dump(mode="json", exclude_none=isinstance(message, Rejection)))


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
