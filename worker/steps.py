"""The steps a loaded rank runs: the worker's half of tpi.master.forward.

A step starts with one message from the master and is keyed by the step number
that message carries (every allreduce of the step uses it: `StarWorker.begin`):

- STEP (hidden states): a tensor-parallel rank, or a rank of a later pipeline
  stage, runs its slice of its layers on them; a later stage's lead rank then
  sends the stage's output: to the master (HIDDEN), or with direct hops straight
  to the next stage's ranks (their STEP) unless its stage is the last.
- STEP_TOKENS (token ids and the head's want): a vocabulary-parallel rank embeds
  its share of the ids (summed over every rank), runs its layers (a later stage
  first waits for its input, a STEP), takes the final hidden states (a rank
  outside the last stage gets them as FINAL) and answers the head's want (HEAD).
- HEAD_MORE: a further top-p round for one row of the last step.
"""

from __future__ import annotations

import time

import torch

from tpi.comm.wire import (
    HiddenHeader,
    Kind,
    Message,
    ProtocolError,
    StepHeader,
    encode_data,
    payload_ids,
    payload_tensor,
    tensor_payload,
)
from tpi.model.batch import BatchStep, BatchStepError
from tpi.model.want import Want
from tpi.worker.master_channel import BETWEEN_STEPS, MasterChannel
from tpi.worker.rank_loader import LoadedRank


class RankSteps:
    def __init__(self, channel: MasterChannel, loaded: LoadedRank, serve_between) -> None:
        self.channel = channel
        self.loaded = loaded
        self.decoder = loaded.runtime.decoder
        # Serves a request that arrived while a pipeline stage waited for its input.
        self.serve_between = serve_between
        self.compute_seconds = 0.0
        self.steps = 0

    def step(self, msg: Message) -> None:
        """A STEP: this rank's layers on the hidden states it carries."""
        h, loaded, decoder = msg.data, self.loaded, self.decoder
        if len(h.shape) != 2 or h.shape[1] != decoder.cfg.hidden_size:
            raise ProtocolError(f"malformed STEP {h}")
        if loaded.head is not None:
            raise ProtocolError("STEP with hidden states sent to a vocabulary-parallel rank")
        batch = _batch(h.batch, h.shape[0])
        x = payload_tensor(msg.payload, h).to(decoder.dtype, copy=True)
        loaded.collective.begin(h.step, h.pos)
        t0 = time.perf_counter()
        out = decoder.run(x, batch, h.chunks)
        if loaded.next_stage:  # the next stage starts from here, without the master
            out = out.contiguous()
            nxt = StepHeader(
                h.session, h.step, h.pos, h.chunks, out.dtype, tuple(out.shape), h.batch
            )
            frames = [encode_data(Kind.STEP, nxt), tensor_payload(out)]
            for rank in loaded.next_stage:
                self.channel.send_to(rank, frames)
        elif loaded.hands_on is not None:
            self._send_hidden(out, h.step)
        self._count(t0)

    def step_tokens(self, msg: Message) -> None:
        """A STEP_TOKENS: a vocabulary-parallel rank's whole step."""
        b, loaded, decoder = msg.body, self.loaded, self.decoder
        if loaded.head is None:
            raise ProtocolError("STEP_TOKENS sent to a rank without a vocabulary slice")
        ids = payload_ids(msg.payload, decoder.cfg.vocab_size)
        if b["chunks"] < 1:
            raise ProtocolError(f"malformed STEP_TOKENS {b}")
        batch = _batch(b["batch"], ids.numel())
        try:
            want = Want.from_wire(b["head"], ids.numel())
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        loaded.collective.begin(b["step"], batch.segments[0].pos)
        t0 = time.perf_counter()
        x = loaded.head.embed(ids, decoder.dtype)
        if loaded.stage == 0:
            h = decoder.run(x, batch, b["chunks"])
        else:  # a later pipeline stage: its input comes when the stages before are done
            h = self._expect(Kind.STEP, x.shape, b["step"]).to(decoder.dtype, copy=True)
            h = decoder.run(h, batch, 1)
            if loaded.hands_on is not None:
                self._send_hidden(h, b["step"])
        if not loaded.last_stage and want.anything:
            # The final states, for this rank's head rows.
            h = self._expect(Kind.FINAL, x.shape, b["step"]).to(decoder.dtype)
        loaded.head.answer(h, want)
        self._count(t0)

    def head_more(self, msg: Message) -> None:
        loaded = self.loaded
        if loaded.head is None or msg.body["step"] != loaded.collective.step:
            raise ProtocolError("HEAD_MORE for a step this worker did not sample")
        loaded.head.more(msg.body["row"], msg.body["round"], msg.body["count"])

    def _send_hidden(self, out: torch.Tensor, step: int) -> None:
        """This stage's output, from its lead to the master (HIDDEN)."""
        out = out.contiguous()
        header = HiddenHeader(
            self.channel.session, step, self.loaded.hands_on, out.dtype, out.shape
        )
        self.channel.send([encode_data(Kind.HIDDEN, header), tensor_payload(out)])
        self.loaded.collective.stats.bytes_sent += header.nbytes()

    def _count(self, t0: float) -> None:
        self.compute_seconds += time.perf_counter() - t0
        self.steps += 1

    def _expect(self, kind: Kind, shape, step: int) -> torch.Tensor:
        """The next message, which must be `kind` of this step and shape (a pipeline
        stage's input, or its final states). The stages before may take long; a
        master that vanishes meanwhile is noticed by its link."""
        msg = self.channel.next(None)
        while msg.kind in BETWEEN_STEPS:  # kept from an allreduce
            self.serve_between(msg)
            msg = self.channel.next(None)
        if msg.kind != kind:
            raise ProtocolError(f"expected {kind.name} of step {step}, got {msg.kind.name}")
        h = msg.data
        if h.step != step or tuple(h.shape) != tuple(shape):
            raise ProtocolError(f"{kind.name} of step {h.step} {h.shape}, expected {step} {shape}")
        return payload_tensor(msg.payload, h)


def _batch(values, tokens: int) -> BatchStep:
    try:
        return BatchStep.from_ints(values, tokens)
    except (BatchStepError, TypeError) as e:
        raise ProtocolError(f"malformed batch step: {e}") from None
