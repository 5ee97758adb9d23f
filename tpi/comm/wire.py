"""Frames on the wire between master and workers. No pickle, ever.

Every message is a ZeroMQ multipart message:

    frame 0: b"TP" | protocol version (u8) | kind (u8) | body
    frame 1: optional raw payload (tensor bytes, file chunk)

Control kinds carry a small JSON object as body, checked against a schema
before use (STEP_TOKENS also carries the token ids as raw int64 bytes). Data
kinds carry a fixed binary header of their own, with exactly the fields that
kind uses, each meaning one thing, so a receiver can check that a tensor
belongs where it is about to be used:

    STEP         StepHeader    session, step, pos, chunks, dtype, shape, batch
    PARTIAL/SUM  SumHeader     session, step, pos, layer, phase, dtype, shape
    HEAD         HeadHeader    session, step, row, round, mode, dtype, shape
    HIDDEN       HiddenHeader  session, step, stage, dtype, shape
    FINAL        FinalHeader   session, step, dtype, shape

A STEP's batch step (tpi.model.batch.BatchStep as integers) says which sequences of a
batch its rows belong to; it follows the shape as a u16 count and u32 values.

docs/architecture.md lists every kind and field.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import torch

from tpi.errors import TpiError

MAGIC = b"TP"
PROTOCOL_VERSION = (
    6  # 4: batches; 5: HIDDEN; 6: a header type per data kind (HEAD row, HIDDEN stage)
)
MAX_CONTROL_BYTES = 64 * 1024
# No tensor frame is larger: the master cuts longer passes into pieces
# (tpi.master.engine), so a worker can refuse anything bigger before it is
# buffered, authenticated or not (ZMQ_MAXMSGSIZE on its socket).
MAX_FRAME_BYTES = 16 << 20
MAX_INBOUND_BYTES = MAX_FRAME_BYTES + MAX_CONTROL_BYTES
MAX_NDIM = 4


class ProtocolError(TpiError):
    """A peer sent something malformed, unexpected, or of another version."""


class Kind(IntEnum):
    HELLO = 1  # master -> worker: who I am, which shard I want you to run
    WELCOME = 2  # worker -> master: accepted; do I have the shard?
    REFUSE = 3  # worker -> master: not accepted, and why
    PUSH_CHUNK = 4  # master -> worker: a piece of a shard file (+ payload)
    PUSH_ACK = 5  # worker -> master: chunk stored
    PUSH_DONE = 6  # master -> worker: all files sent; verify them
    LOAD = 7  # master -> worker: load the shard with these settings
    READY = 8  # worker -> master: loaded (or shard verified), with numbers
    STEP = 9  # master -> workers: hidden states entering the layers (data)
    PARTIAL = 10  # worker -> master: partial sum of one layer phase (data)
    SUM = 11  # master -> workers: the reduced sum (data)
    END = 12  # master -> worker: session over (or aborted)
    ERROR = 13  # worker -> master: something failed on my side
    PING = 14
    PONG = 15
    STATS = 16  # worker -> master: counters, in answer to a STATS request
    STATS_REQUEST = 17
    CHALLENGE = 18  # worker -> master: my nonce, and proof that I know the secret
    AUTH = 19  # master -> worker: proof that I know the secret
    STEP_TOKENS = 20  # master -> workers: token ids of a step (+ int64 payload), vocab-parallel
    HEAD = 21  # worker -> master: its logits slice or its token candidates (data)
    HEAD_MORE = 22  # master -> workers: more top-p candidates for this step
    PROFILE_REQUEST = 23  # master -> worker: measure yourself (tpi.planning.request)
    PROFILE = 24  # worker -> master: the measurements
    HIDDEN = 25  # worker -> master: a pipeline stage's output hidden states (data)
    FINAL = 26  # master -> workers: a pipeline's final hidden states, for their head rows (data)
    PEERS = 27  # master -> worker: open these direct links to other workers (pipeline hops)
    PEERED = 28  # worker -> master: the direct links are open (or why not)
    PEER_RTT_REQUEST = 29  # master -> worker: time a round trip to each of your peers
    PEER_RTT = 30  # worker -> master: the medians, by peer rank


class Phase(IntEnum):
    """Which sum of a forward pass a PARTIAL/SUM belongs to."""

    ATTENTION = 0
    MLP = 1
    EMBED = 2  # the vocabulary-parallel embedding (before layer 0; always fp32)


class HeadMode(IntEnum):
    """What a HEAD payload holds."""

    LOGITS = 1  # the rank's float32 logits slice
    CANDIDATES = 2  # float64 token candidates (tpi.model.vocab_head)


DATA_KINDS = frozenset({Kind.STEP, Kind.PARTIAL, Kind.SUM, Kind.HEAD, Kind.HIDDEN, Kind.FINAL})
# HELLO and REFUSE keep their layout in every protocol version, so peers of
# different versions can still tell each other why they cannot talk.
VERSION_FREE_KINDS = frozenset({Kind.HELLO, Kind.REFUSE})

# Required fields and their types, per control kind. Extra fields are ignored
# (forward compatibility within one protocol version).
SCHEMAS: dict[Kind, dict[str, type | tuple[type, ...]]] = {
    Kind.HELLO: {
        "session": int,
        "rank": int,
        "world": int,
        "manifest": str,
        "tpi_version": str,
        "nonce": str,
        "auth": str,
    },
    Kind.CHALLENGE: {"session": int, "nonce": str, "proof": str},
    Kind.AUTH: {"session": int, "proof": str},
    Kind.WELCOME: {"session": int, "have_shard": bool, "partial": dict},
    Kind.REFUSE: {"reason": str},
    Kind.PUSH_CHUNK: {"session": int, "file": str, "offset": int, "total": int},
    Kind.PUSH_ACK: {"session": int, "file": str, "next": int},
    Kind.PUSH_DONE: {"session": int},
    Kind.LOAD: {"session": int, "dtype": str, "wire_dtype": str},
    Kind.READY: {"session": int},
    Kind.END: {"session": int, "reason": str},
    Kind.ERROR: {"session": int, "message": str},
    Kind.PING: {"session": int},
    Kind.PONG: {"session": int},
    Kind.STATS_REQUEST: {"session": int},
    Kind.STATS: {"session": int, "stats": dict},
    Kind.STEP_TOKENS: {"session": int, "step": int, "batch": list, "chunks": int, "head": dict},
    Kind.HEAD_MORE: {"session": int, "step": int, "row": int, "round": int, "count": int},
    Kind.PROFILE_REQUEST: {"session": int, "request": dict},
    Kind.PROFILE: {"session": int, "profile": dict},
    Kind.PEERS: {"session": int, "links": list},
    Kind.PEERED: {"session": int, "failed": str},
    Kind.PEER_RTT_REQUEST: {"session": int, "pings": int},
    Kind.PEER_RTT: {"session": int, "rtts": dict},
}
MAX_STEP_TOKENS = 1 << 20
MAX_BATCH_INTS = 4096  # a batch step's integers: 3 per sequence of a batch, plus releases

DTYPE_CODES = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.float64: 3,  # token candidates (values and indices, exact)
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}

_PREFIX = struct.Struct("<2sBB")


class DataHeader:
    """What every data header has: a session, a step, and the tensor's dtype and
    shape (which the payload must match). Subclasses are dataclasses with slots,
    not frozen: a frozen dataclass is ~3x slower to build, and headers are built
    per message on the allreduce path; nobody mutates one."""

    __slots__ = ()
    session: int
    step: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(slots=True)
class StepHeader(DataHeader):
    """STEP: hidden states entering a group's layers."""

    session: int
    step: int
    pos: int  # the first position of the step's first sequence
    chunks: int  # pieces the step is cut into (1 = none)
    dtype: torch.dtype
    shape: tuple[int, ...]
    batch: tuple[int, ...] = ()  # its BatchStep as integers


@dataclass(slots=True)
class SumHeader(DataHeader):
    """PARTIAL (a rank's share) and SUM (the total) of one allreduce."""

    session: int
    step: int
    pos: int  # the first row of the piece it belongs to (overlapped pieces differ)
    layer: int
    phase: int  # a Phase
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def key(self) -> tuple[int, int, int, int]:
        """(step, layer, phase, pos): tpi.comm.reducer's key of this allreduce."""
        return (self.step, self.layer, self.phase, self.pos)


@dataclass(slots=True)
class HeadHeader(DataHeader):
    """HEAD: a rank's logits slice or token candidates for one row of a step."""

    session: int
    step: int
    row: int  # the pass row whose next token is chosen
    round: int  # 0, or the top-p round that asked for more candidates
    mode: int  # a HeadMode
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(slots=True)
class HiddenHeader(DataHeader):
    """HIDDEN: a pipeline stage's output hidden states."""

    session: int
    step: int
    stage: int  # the index of the stage whose output this is
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(slots=True)
class FinalHeader(DataHeader):
    """FINAL: a pipeline's final hidden states, for ranks outside its last stage."""

    session: int
    step: int
    dtype: torch.dtype
    shape: tuple[int, ...]


HEADERS: dict[Kind, type[DataHeader]] = {
    Kind.STEP: StepHeader,
    Kind.PARTIAL: SumHeader,
    Kind.SUM: SumHeader,
    Kind.HEAD: HeadHeader,
    Kind.HIDDEN: HiddenHeader,
    Kind.FINAL: FinalHeader,
}
# Per data kind: its fields before dtype and shape, in wire order, and their packing.
_FIELDS: dict[Kind, tuple[str, ...]] = {
    kind: tuple(f for f in cls.__dataclass_fields__ if f not in ("dtype", "shape", "batch"))
    for kind, cls in HEADERS.items()
}
_CODES = {
    "session": "Q",
    "step": "I",
    "pos": "I",
    "row": "I",
    "layer": "H",
    "stage": "H",
    "phase": "B",
    "chunks": "B",
    "round": "B",
    "mode": "B",
}
_HEADERS = {
    kind: struct.Struct("<" + "".join(_CODES[f] for f in fields) + "BB")
    for kind, fields in _FIELDS.items()
}
_DIM = struct.Struct("<I")
_BATCH_COUNT = struct.Struct("<H")
_SHAPES = [struct.Struct("<" + "I" * n) for n in range(5)]


@dataclass
class Message:
    kind: Kind
    body: dict[str, Any] | DataHeader
    payload: Any = None  # zmq.Frame / bytes, or None
    version: int = PROTOCOL_VERSION

    @property
    def data(self) -> DataHeader:
        assert isinstance(self.body, DataHeader)
        return self.body


def encode_control(kind: Kind, body: dict[str, Any]) -> bytes:
    return (
        _PREFIX.pack(MAGIC, PROTOCOL_VERSION, int(kind))
        + json.dumps(body, separators=(",", ":")).encode()
    )


def encode_data(kind: Kind, h: DataHeader) -> bytes:
    if type(h) is not HEADERS[kind]:
        raise TypeError(f"{kind.name} takes a {HEADERS[kind].__name__}, not {type(h).__name__}")
    if len(h.shape) > MAX_NDIM:
        raise ValueError("too many dimensions")
    fields = [getattr(h, f) for f in _FIELDS[kind]]
    out = (
        _PREFIX.pack(MAGIC, PROTOCOL_VERSION, kind)
        + _HEADERS[kind].pack(*fields, DTYPE_CODES[h.dtype], len(h.shape))
        + _SHAPES[len(h.shape)].pack(*h.shape)
    )
    if kind == Kind.STEP:
        if len(h.batch) > MAX_BATCH_INTS:
            raise ValueError("batch step too long")
        out += _BATCH_COUNT.pack(len(h.batch)) + struct.pack(f"<{len(h.batch)}I", *h.batch)
    return out


def _check_data_fields(kind: Kind, h: DataHeader) -> None:
    """Values a well-behaved peer never sends, refused before anything is used."""
    if isinstance(h, StepHeader) and h.chunks < 1:
        raise ProtocolError("STEP with no chunks")
    if kind in (Kind.PARTIAL, Kind.SUM) and h.phase not in Phase._value2member_map_:
        raise ProtocolError(f"{kind.name} of unknown phase {h.phase}")
    if kind == Kind.HEAD and h.mode not in HeadMode._value2member_map_:
        raise ProtocolError(f"HEAD of unknown mode {h.mode}")


def tensor_payload(t: torch.Tensor):
    """A zero-copy buffer of `t`'s bytes (keep `t` alive until sent)."""
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; ship the raw 16-bit words
        return t.view(torch.int16).numpy()
    return t.numpy()


def ids_payload(ids: list[int]) -> bytes:
    """Token ids as raw little-endian int64 (the STEP_TOKENS payload)."""
    return torch.tensor(ids, dtype=torch.int64).numpy().astype("<i8").tobytes()


def payload_ids(payload: Any, vocab_size: int) -> torch.Tensor:
    """The token ids of a STEP_TOKENS payload, checked: whole int64s, 1..MAX of them, in vocab."""
    buf = payload.bytes if hasattr(payload, "bytes") else bytes(payload or b"")
    if not buf or len(buf) % 8 or len(buf) // 8 > MAX_STEP_TOKENS:
        raise ProtocolError(
            f"STEP_TOKENS payload of {len(buf)} bytes is not 1..{MAX_STEP_TOKENS} ids"
        )
    ids = torch.frombuffer(bytearray(buf), dtype=torch.int64)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ProtocolError(
            f"STEP_TOKENS carries a token id outside the vocabulary of {vocab_size}"
        )
    return ids


def _payload_buffer(payload: Any, h: DataHeader) -> memoryview:
    """The received bytes, checked to be exactly what the header describes."""
    buf = payload.buffer if hasattr(payload, "buffer") else memoryview(payload)
    if buf.nbytes != h.nbytes():
        raise ProtocolError(f"payload has {buf.nbytes} bytes, header says {h.nbytes()}")
    return buf


def payload_tensor(payload: Any, h: DataHeader) -> torch.Tensor:
    """View the received bytes as the tensor the header describes (no copy)."""
    buf = _payload_buffer(payload, h)
    if buf.nbytes == 0:
        return torch.empty(h.shape, dtype=h.dtype)
    if buf.readonly:  # plain bytes (zmq frames are writable, so this is not the hot path)
        buf = memoryview(bytearray(buf))
    return torch.frombuffer(buf, dtype=h.dtype).view(h.shape)


def payload_array(payload: Any, h: DataHeader) -> np.ndarray:
    """A float32 payload as a numpy array of the header's shape (no copy)."""
    return np.frombuffer(_payload_buffer(payload, h), dtype=np.float32).reshape(h.shape)


def _check_schema(kind: Kind, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolError(f"{kind.name} body is not a JSON object")
    for field, typ in SCHEMAS[kind].items():
        value = body.get(field)
        # bool is an int in Python; do not let True pass as a number or vice versa.
        if value is None or not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ProtocolError(
                f"{kind.name} field {field!r} missing or not {getattr(typ, '__name__', typ)}"
            )
    return body


def decode(frames: list[Any]) -> Message:
    """Parse and validate a multipart message; raise ProtocolError on anything off."""
    if not frames or len(frames) > 2:
        raise ProtocolError(f"expected 1 or 2 frames, got {len(frames)}")
    head = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
    if len(head) < _PREFIX.size:
        raise ProtocolError("frame too short")
    magic, version, kind_code = _PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise ProtocolError("not a tpi message")
    try:
        kind = Kind(kind_code)
    except ValueError:
        kind = None
    if version != PROTOCOL_VERSION and kind not in VERSION_FREE_KINDS:
        raise ProtocolError(f"protocol version {version}, this tpi speaks {PROTOCOL_VERSION}")
    if kind is None:
        raise ProtocolError(f"unknown message kind {kind_code}")
    payload = frames[1] if len(frames) == 2 else None
    body_bytes = head[_PREFIX.size :]
    if kind in DATA_KINDS:
        layout = _HEADERS[kind]
        if len(body_bytes) < layout.size:
            raise ProtocolError(f"{kind.name} header too short")
        *values, dcode, ndim = layout.unpack_from(body_bytes)
        end = layout.size + ndim * _DIM.size if ndim <= MAX_NDIM else -1
        batch: tuple[int, ...] = ()
        if kind == Kind.STEP and end >= 0 and len(body_bytes) >= end + _BATCH_COUNT.size:
            (count,) = _BATCH_COUNT.unpack_from(body_bytes, end)
            if count <= MAX_BATCH_INTS and len(body_bytes) == end + _BATCH_COUNT.size + 4 * count:
                batch = struct.unpack_from(f"<{count}I", body_bytes, end + _BATCH_COUNT.size)
                end = len(body_bytes)
            else:
                end = -1
        elif kind == Kind.STEP:
            end = -1
        if dcode not in CODE_DTYPES or end < 0 or len(body_bytes) != end:
            raise ProtocolError(f"{kind.name} header malformed")
        shape = _SHAPES[ndim].unpack_from(body_bytes, layout.size)
        if payload is None:
            raise ProtocolError(f"{kind.name} without payload")
        header = HEADERS[kind](*values, CODE_DTYPES[dcode], shape)
        if batch:
            header.batch = batch
        _check_data_fields(kind, header)
        return Message(kind, header, payload)
    if len(body_bytes) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"{kind.name} body too large")
    try:
        body = json.loads(body_bytes)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"{kind.name} body is not valid JSON") from None
    if version != PROTOCOL_VERSION and kind == Kind.HELLO:
        # Another version's HELLO: its fields may differ; the receiver only
        # needs the version to refuse it clearly.
        return Message(kind, body if isinstance(body, dict) else {}, payload, version)
    return Message(kind, _check_schema(kind, body), payload, version)
