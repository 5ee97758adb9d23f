"""Frame encoding: round trips, and nothing malformed gets past decode."""

from __future__ import annotations

import contextlib
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tpi.comm.wire import (
    PROTOCOL_VERSION,
    Kind,
    ProtocolError,
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
