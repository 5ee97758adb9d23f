"""Frame encoding: round trips, and nothing malformed gets past decode."""

from __future__ import annotations

import contextlib
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tpi.comm.wire import (
    DATA_KINDS,
    HEADERS,
    PROTOCOL_VERSION,
    FinalHeader,
    HeadHeader,
    HiddenHeader,
    Kind,
    ProtocolError,
    StepHeader,
    SumHeader,
    decode,
    encode_control,
    encode_data,
    payload_tensor,
    tensor_payload,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_round_trip(dtype):
    t = torch.randn(3, 7).to(dtype)
    h = SumHeader(5, 9, 11, 2, 1, dtype, (3, 7))
    msg = decode([encode_data(Kind.PARTIAL, h), bytes(memoryview(tensor_payload(t)).cast("B"))])
    assert msg.kind == Kind.PARTIAL and msg.data == h
    assert torch.equal(payload_tensor(msg.payload, msg.data), t)


def test_control_round_trip_and_schema():
    body = {
        "session": 1,
        "rank": 2,
        "world": 3,
        "manifest": "ab",
        "tpi_version": "x",
        "nonce": "00" * 16,
        "auth": "hmac",
        "extra": [1],
    }
    assert decode([encode_control(Kind.HELLO, body)]).body == body
    with pytest.raises(ProtocolError, match="rank"):
        decode([encode_control(Kind.HELLO, {**body, "rank": "2"})])
    with pytest.raises(ProtocolError, match="rank"):
        decode([encode_control(Kind.HELLO, {**body, "rank": True})])
    with pytest.raises(ProtocolError, match="nonce"):
        decode([encode_control(Kind.HELLO, {k: v for k, v in body.items() if k != "nonce"})])


def test_payload_size_must_match_header():
    h = SumHeader(1, 1, 0, 0, 0, torch.float32, (2, 4))
    msg = decode([encode_data(Kind.SUM, h), b"\0" * 31])
    with pytest.raises(ProtocolError, match="31 bytes"):
        payload_tensor(msg.payload, msg.data)


def test_other_versions_hello_and_refuse_still_decode():
    hello = struct.pack("<2sBB", b"TP", PROTOCOL_VERSION + 1, Kind.HELLO) + b'{"whatever": 1}'
    assert decode([hello]).version == PROTOCOL_VERSION + 1
    step = struct.pack("<2sBB", b"TP", PROTOCOL_VERSION + 1, Kind.PING) + b'{"session": 1}'
    with pytest.raises(ProtocolError, match="protocol version"):
        decode([step])


@settings(max_examples=500, deadline=None)
@given(frames=st.lists(st.binary(max_size=80), min_size=0, max_size=3))
def test_random_frames_only_raise_protocol_error(frames):
    with contextlib.suppress(ProtocolError):
        decode(frames)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(list(Kind)), junk=st.binary(max_size=60), cut=st.integers(0, 40))
def test_valid_prefix_with_junk_or_truncation(kind, junk, cut):
    head = struct.pack("<2sBB", b"TP", PROTOCOL_VERSION, kind) + junk
    for frames in ([head], [head[: max(0, len(head) - cut)]], [head, junk]):
        with contextlib.suppress(ProtocolError):
            decode(frames)


# Every data kind, with each of its fields set apart from the others, so a field
# read from another's place (the old shared header's `pos` as a HEAD's row) shows.
HEADER_EXAMPLES = {
    Kind.STEP: StepHeader(11, 12, 13, 3, torch.float32, (2, 5), (0, 13, 2)),
    Kind.PARTIAL: SumHeader(21, 22, 23, 24, 1, torch.bfloat16, (2, 5)),
    Kind.SUM: SumHeader(31, 32, 33, 34, 2, torch.float32, (1, 5)),
    Kind.HEAD: HeadHeader(41, 42, 43, 4, 2, torch.float64, (7, 3)),
    Kind.HIDDEN: HiddenHeader(51, 52, 3, torch.float16, (4, 5)),
    Kind.FINAL: FinalHeader(61, 62, torch.float32, (4, 5)),
}


def test_every_data_kind_has_its_own_header_and_round_trips():
    assert set(HEADER_EXAMPLES) == set(DATA_KINDS) == set(HEADERS)
    for kind, h in HEADER_EXAMPLES.items():
        msg = decode([encode_data(kind, h), bytes(h.nbytes())])
        assert msg.kind == kind and type(msg.data) is HEADERS[kind] and msg.data == h
    head = decode([encode_data(Kind.HEAD, HEADER_EXAMPLES[Kind.HEAD]), bytes(7 * 3 * 8)]).data
    assert (head.row, head.round, head.mode) == (43, 4, 2)
    hidden = decode([encode_data(Kind.HIDDEN, HEADER_EXAMPLES[Kind.HIDDEN]), bytes(40)]).data
    assert hidden.stage == 3 and not hasattr(hidden, "pos")


def test_a_header_of_another_kind_is_not_encoded():
    with pytest.raises(TypeError, match="SUM takes a SumHeader"):
        encode_data(Kind.SUM, HEADER_EXAMPLES[Kind.HEAD])
    with pytest.raises(TypeError, match="STEP takes a StepHeader"):
        encode_data(Kind.STEP, HEADER_EXAMPLES[Kind.FINAL])


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(DATA_KINDS)), cut=st.integers(1, 12), junk=st.binary(max_size=8))
def test_a_cut_or_padded_data_header_is_refused(kind, cut, junk):
    frame = encode_data(kind, HEADER_EXAMPLES[kind])
    payload = bytes(HEADER_EXAMPLES[kind].nbytes())
    with pytest.raises(ProtocolError):
        decode([frame[:-cut], payload])
    if junk:
        with pytest.raises(ProtocolError):
            decode([frame + junk, payload])
