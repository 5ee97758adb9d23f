"""Stop sequences on streamed text (master/serve/stop_strings.py): nothing that
could start a stop string is emitted early, and nothing after one ever is."""

from __future__ import annotations

from tpi.master.serve.stop_strings import StopMatcher


def _feed(m: StopMatcher, pieces: list[str]) -> list[str]:
    return [m.push(p) for p in pieces]


def test_a_stop_split_across_pieces_is_never_emitted():
    m = StopMatcher(["STOP"])
    out = _feed(m, ["Hel", "lo S", "TO", "P and more"])
    assert "".join(out) == "Hello " and m.stopped
    assert m.push("later") == "" and m.flush() == ""


def test_only_what_could_start_a_stop_is_held_back():
    m = StopMatcher(["xyz"])
    assert m.push("abcdef") == "abcd"  # the last len("xyz") - 1 characters wait
    assert m.push("g") == "e"
    assert m.flush() == "fg" and not m.stopped


def test_a_near_miss_is_released_once_it_cannot_be_a_stop():
    m = StopMatcher(["</s>"])
    assert "".join(_feed(m, ["a </", "x> b"])) + m.flush() == "a </x> b"
    assert not m.stopped


def test_the_earliest_of_several_stops_cuts():
    m = StopMatcher(["b", "cd"])
    assert m.push("acdb") == "a" and m.stopped


def test_without_stops_text_passes_at_once():
    for stops in ([], [""]):  # an empty stop string is no stop
        m = StopMatcher(stops)
        assert _feed(m, ["a", "bc"]) == ["a", "bc"] and m.flush() == "" and not m.stopped
