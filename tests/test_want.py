"""What a pass asks of the head: one typed value, checked when it arrives."""

from __future__ import annotations

import json

import pytest

from tpi.model.vocab_head import HeadRequest
from tpi.model.want import Want, WantMode

REQ = HeadRequest(temperature=0.7, top_k=40, top_p=0.9, noise_seed=12345, count=64)


def _over_the_wire(want: Want, tokens: int) -> Want:
    return Want.from_wire(json.loads(json.dumps(want.to_wire())), tokens)


@pytest.mark.parametrize(
    "want",
    [
        Want.nothing(),
        Want.logits(),
        Want.logits([0, 3]),
        Want.choose([2, 5], [REQ, HeadRequest()]),
    ],
)
def test_every_want_survives_json(want):
    assert _over_the_wire(want, 6) == want


def test_what_each_want_says():
    assert not Want.nothing().anything and Want.logits().anything
    assert Want.logits().rows is None and Want.logits([4]).rows == (4,)
    chosen = Want.choose([1, 4], [REQ, REQ])
    assert chosen.mode == WantMode.CHOOSE and chosen.chosen_rows == [1, 4]
    with pytest.raises(ValueError):
        Want.choose([1, 2], [REQ])  # one request per row


@pytest.mark.parametrize(
    "body, message",
    [
        ("none", "not an object"),
        ({"mode": "everything"}, "unknown head request mode"),
        ({"mode": "logits", "rows": [6]}, "rows the step does not have"),
        ({"mode": "logits", "rows": [-1]}, "rows the step does not have"),
        ({"mode": "logits", "rows": [True]}, "rows the step does not have"),
        ({"mode": "logits", "rows": []}, "rows the step does not have"),
        ({"mode": "logits", "rows": "last"}, "rows the step does not have"),
        ({"mode": "choose", "requests": []}, "rows the step does not have"),
        ({"mode": "choose", "requests": [{"row": 9, **REQ.to_dict()}]}, "rows the step"),
        ({"mode": "choose", "requests": [{"row": 1}]}, "bad head request"),
        ({"mode": "choose", "requests": [{"row": 1, **REQ.to_dict(), "top_p": 0}]}, "bad head"),
    ],
)
def test_a_want_no_master_sends_is_refused(body, message):
    with pytest.raises(ValueError, match=message):
        Want.from_wire(body, 6)
