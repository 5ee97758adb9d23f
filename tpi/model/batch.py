"""What one forward pass runs: the sequences in it and where each one stands.

A pass carries a block of token rows. The rows belong to one or more sequences
(a batch), each a contiguous run of rows with its own KV cache slot and first
position: one row for a sequence that decodes, many for a prompt or a piece of
one. The same batch step is sent with the step to every rank, so every rank writes
the same cache slots at the same positions.

A pass may also be cut into pieces that move through each layer one after the
other, so that one piece's allreduce is on the wire while the next computes:
chunks of a long prompt (overlapped prefill), or nano-batches of a batch of
sequences (NanoFlow). Every rank cuts a batch step into the same pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_SLOTS = 1024  # cache slots a batch step may name (a worker refuses others)


class BatchStepError(ValueError):
    """A batch step that no master makes (a worker reports it as a protocol error)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """`length` rows of sequence `slot`, at positions [pos, pos + length)."""

    slot: int
    pos: int
    length: int

    @property
    def end(self) -> int:
        return self.pos + self.length


@dataclass(frozen=True, slots=True)
class Piece:
    """Rows [start, end) of a pass, holding these segments (in row order)."""

    start: int
    end: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class BatchStep:
    segments: tuple[Segment, ...]
    # Slots whose sequences ended: their caches are freed before the pass runs (a
    # slot may be released and run again at once, by a new sequence).
    release: tuple[int, ...] = ()

    @classmethod
    def single(cls, pos: int, length: int, slot: int = 0) -> BatchStep:
        return cls((Segment(slot, pos, length),))

    @property
    def first_pos(self) -> int:
        return self.segments[0].pos

    @property
    def tokens(self) -> int:
        return sum(s.length for s in self.segments)

    def last_rows(self) -> list[int]:
        """The row of each segment's last token (where its next token is read)."""
        rows, end = [], 0
        for s in self.segments:
            end += s.length
            rows.append(end - 1)
        return rows

    def pieces(self, count: int) -> list[Piece]:
        """The pass cut into at most `count` pieces of nearly equal rows: a single
        sequence is cut between its tokens (chunks), several between sequences
        (nano-batches)."""
        if len(self.segments) == 1:
            (seg,) = self.segments
            return [
                Piece(a, b, (Segment(seg.slot, seg.pos + a, b - a),))
                for a, b in chunk_bounds(seg.length, count)
            ]
        count = max(1, min(count, len(self.segments)))
        total, pieces, group, start, row = self.tokens, [], [], 0, 0
        for i, seg in enumerate(self.segments):
            group.append(seg)
            row += seg.length
            to_open = count - len(pieces) - 1  # pieces after this one
            if to_open == 0:
                continue  # the last piece takes the rest
            # Close at this piece's share of the rows, or when each piece still to
            # come needs one of the segments left.
            if row >= total * (len(pieces) + 1) / count or len(self.segments) - i - 1 == to_open:
                pieces.append(Piece(start, row, tuple(group)))
                group, start = [], row
        pieces.append(Piece(start, row, tuple(group)))
        return pieces

    def to_ints(self) -> list[int]:
        """The batch step as integers for the wire: releases, then (slot, pos, length)*."""
        out = [len(self.release), *self.release]
        for s in self.segments:
            out += [s.slot, s.pos, s.length]
        return out

    @classmethod
    def from_ints(cls, values: list[int] | tuple[int, ...], tokens: int) -> BatchStep:
        """A received batch step, checked against the `tokens` rows it came with."""
        values = list(values)
        if not values or not all(isinstance(v, int) and v >= 0 for v in values):
            raise BatchStepError("a batch step is a non-empty list of non-negative integers")
        n = values[0]
        release, rest = tuple(values[1 : 1 + n]), values[1 + n :]
        if len(release) != n or len(rest) % 3 or not rest:
            raise BatchStepError("a batch step's length does not match its counts")
        segs = tuple(Segment(*rest[i : i + 3]) for i in range(0, len(rest), 3))
        batch = cls(segs, release)
        batch.check(tokens)
        return batch

    def check(self, tokens: int) -> None:
        if any(s.length < 1 for s in self.segments):
            raise BatchStepError("a segment without tokens")
        if any(not 0 <= s.slot < MAX_SLOTS for s in self.segments) or any(
            not 0 <= r < MAX_SLOTS for r in self.release
        ):
            raise BatchStepError(f"cache slots are 0..{MAX_SLOTS - 1}")
        if self.tokens != tokens:
            raise BatchStepError(
                f"the batch step covers {self.tokens} rows, the step carries {tokens}"
            )


def chunk_bounds(length: int, chunks: int) -> list[tuple[int, int]]:
    """[start, end) of `chunks` nearly equal consecutive pieces of `length` tokens."""
    chunks = max(1, min(chunks, length))
    base, extra = divmod(length, chunks)
    out, start = [], 0
    for c in range(chunks):
        end = start + base + (1 if c < extra else 0)
        out.append((start, end))
        start = end
    return out
