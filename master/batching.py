"""Continuous batching: many generations share every forward pass.

On a CPU a decode step costs the bytes of weights it reads (from RAM, or from
disk with the sliding window) and, on a cluster, its round trips; both are the
same for one sequence as for eight. So every running sequence advances in the
same pass (tpi.master.engine.Engine.step): sequences join between steps, leave
when done or cancelled, and a new prompt is fed in chunks of at most
`prefill_chunk` tokens mixed into the decode steps, so running streams are not
held up for a whole prompt.

Each sequence keeps its own sampler (seeded sampling draws the same noise as it
would alone), stop tokens and token budget, so the tokens it gets are exactly
what it gets alone: a single answer (tpi.master.generation.generate_tokens) is
this batcher running a batch of one.

Admission counts KV-cache memory (tpi.master.kv_budget): a sequence is admitted
only while the worst case of every admitted sequence's cache fits the budget.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from tpi.comm.links import ClusterError
from tpi.errors import PromptError
from tpi.master.engine import BatchRow, Engine
from tpi.master.kv_budget import KVBudget
from tpi.master.sampling import Sampler
from tpi.master.sequence import BatchSequence, check_prompt

# Failed passes in a row before giving up: each recovery costs a re-plan, maybe a
# push, and a replay, and a cluster that keeps failing will not finish anything.
MAX_RECOVERIES = 8


class Batcher:
    """Runs sequences together; `step()` advances every running one by a pass."""

    def __init__(
        self,
        engine: Engine,
        max_batch: int = 8,
        prefill_chunk: int = 128,
        kv_budget_bytes: int | None = None,
        kv_bytes_per_position: int | None = None,
        recover: Callable[[ClusterError], Engine] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max batch must be >= 1")
        self.engine = engine
        self.max_batch = max_batch
        # 0: a prompt runs whole in one pass.
        self.prefill_chunk = prefill_chunk
        self.kv = KVBudget(
            kv_budget_bytes, kv_bytes_per_position or engine.decoder.caches.bytes_per_position
        )
        self.waiting: deque[BatchSequence] = deque()
        self.running: list[BatchSequence] = []
        self._free = list(range(max_batch))
        self.steps = 0
        # tpi.master.elastic: an engine over the surviving ranks after a loss (None: fail).
        self.recover = recover
        self.recoveries = 0
        self._failed_in_a_row = 0

    # --- admission ------------------------------------------------------------------

    @property
    def kv_budget_bytes(self) -> int | None:
        return self.kv.limit_bytes

    @property
    def kv_in_use(self) -> int:
        return self.kv.in_use(self.engine, self.running, self._free)

    def submit(self, seq: BatchSequence) -> None:
        """Queue a sequence; it joins the batch at the next step with room for it."""
        check_prompt(self.engine, seq.prompt)
        seq.params.validate()
        self.kv.refuse_if_never_fits(self.engine, seq)
        self.waiting.append(seq)

    def _admit(self) -> None:
        while self.waiting and self._free:
            seq = self.waiting[0]
            if seq.cancel.is_set():
                self.waiting.popleft()
                self._finish(seq, "cancelled", running=False)
                continue
            need = self.kv.need(self.engine, seq)
            if not self.kv.fits(self.engine, self.running, self._free, need):
                for slot in self._free:  # idle caches kept for reuse go first
                    self.engine.free(slot)
                if not self.kv.fits(self.engine, self.running, self._free, need):
                    return  # waits for running sequences to end (oldest first)
            self.waiting.popleft()
            self._start(seq, need)

    def _pick_slot(self, prompt: Sequence[int]) -> tuple[int, int]:
        """The free slot whose cached tokens share the longest prefix with `prompt`
        (a chat's next turn reuses its cache), and where the prompt starts there."""
        best, start = self._free[0], -1
        for slot in self._free:
            s = self.engine.reuse_start(prompt, slot)
            if s > start:
                best, start = slot, s
        return best, max(start, 0)

    def _start(self, seq: BatchSequence, need: int) -> None:
        slot, start = self._pick_slot(seq.prompt)
        self._free.remove(slot)
        if start == 0 and self.kv.slot_bytes(self.engine, slot) > need:
            self.engine.free(slot)  # a bigger cache than this sequence may need: regrow
        seq.slot, seq.fed, seq.kv_bytes = slot, start, need
        seq.budget = min(seq.params.max_new_tokens, self.engine.max_positions - len(seq.prompt))
        seq.sampler = Sampler(seq.params)
        seq.stats.prompt_tokens = len(seq.prompt)
        seq.stats.reused_tokens = start
        seq.t_start = time.perf_counter()
        self.running.append(seq)

    # --- stepping -------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def _rows(self) -> list[tuple[BatchSequence, BatchRow]]:
        rows = []
        # Decoding sequences first: each costs one row.
        for seq in self.running:
            if not seq.prefilling:
                rows.append(
                    (
                        seq,
                        BatchRow(
                            seq.slot, [seq.next_token], seq.fed + len(seq.tokens) - 1, seq.sampler
                        ),
                    )
                )
        room = self.engine.max_pass_tokens or 1 << 30
        room -= len(rows)
        chunk = self.prefill_chunk or 1 << 30
        budget = min(room, chunk)
        for seq in self.running:
            if seq.prefilling and budget > 0:
                feed = seq.feed
                n = min(budget, len(feed) - seq.fed)
                # A replay chooses nothing: the token after it is already known.
                choose = seq.fed + n == len(feed) and seq.replay is None
                ids = feed[seq.fed : seq.fed + n]
                rows.append(
                    (seq, BatchRow(seq.slot, ids, seq.fed, seq.sampler if choose else None))
                )
                budget -= n
        return rows

    def step(self) -> int:
        """One pass over every running sequence; returns how many sequences ran."""
        self._drop_cancelled()
        self._admit()
        if not self.running:
            return 0
        rows = self._rows()
        states = [(r.sampler, r.sampler.checkpoint()) for _, r in rows if r.sampler is not None]
        try:
            out = self.engine.step([r for _, r in rows])
        except ClusterError as e:
            self._survive(e, states)
            return len(rows)
        except BaseException as e:
            self._fail_all(e)
            raise
        self.steps += 1
        if states:  # a token was chosen: the failures before it are behind us
            self._failed_in_a_row = 0
        now = time.perf_counter()
        for (seq, row), token in zip(rows, out, strict=True):
            if seq.prefilling:
                seq.fed += len(row.ids)
                if seq.replay is not None and not seq.prefilling:
                    seq.replay = None  # replayed: decoding goes on where it was
                    seq.fed = len(seq.prompt)
                    continue
                if token is None:
                    continue
                seq.stats.prefill_seconds = now - seq.t_start
                seq.t_decode = now
            else:
                seq.stats.decode_steps += 1
                seq.stats.decode_seconds = now - seq.t_decode
            self._take(seq, token)
        return len(rows)

    def _fail_all(self, e: BaseException) -> None:
        for seq in list(self.running):
            self._finish(seq, "error", error=e)

    def _survive(self, error: ClusterError, states: list[tuple[Sampler, torch.Tensor]]) -> None:
        """A pass failed on the cluster: go on over the survivors (the pass's draws
        undone, so its tokens get the same noise again), or fail every running
        sequence and raise."""
        if self.recover is None:
            self._fail_all(error)
            raise error
        if self._failed_in_a_row >= MAX_RECOVERIES:
            gave_up = ClusterError(f"gave up after {MAX_RECOVERIES} recoveries in a row")
            self._fail_all(gave_up)
            raise gave_up from error
        self._failed_in_a_row += 1
        for sampler, state in states:
            sampler.rewind(state)
        self._recover(error)

    def _recover(self, error: ClusterError) -> None:
        """Continue every running sequence on the engine `recover` gives: each is
        replayed into a fresh slot, then decodes on."""
        try:
            engine = self.recover(error)
        except BaseException as e:  # the reason it cannot continue reaches every request
            self._fail_all(e)
            raise
        self.engine = engine
        self.recoveries += 1
        self._free = list(range(self.max_batch))
        for seq in self.running:
            seq.slot = self._free.pop(0)
            if seq.tokens:
                seq.replay = [*seq.prompt, *seq.tokens[:-1]]
            else:  # the new cluster's caches are empty: the whole prompt runs
                seq.stats.reused_tokens = 0
            seq.fed = 0

    def _take(self, seq: BatchSequence, token: int) -> None:
        """The token chosen after seq's last row: keep it, or end the sequence."""
        if token in seq.stop_ids:
            self._finish(seq, "eos")
            return
        seq.tokens.append(token)
        seq.stats.new_tokens += 1
        seq.next_token = token
        keep = seq.on_token(token) if seq.on_token is not None else True
        if not keep:
            self._finish(seq, "stop")
        elif len(seq.tokens) >= seq.budget:
            self._finish(seq, "length")
        elif seq.cancel.is_set():
            self._finish(seq, "cancelled")

    def _drop_cancelled(self) -> None:
        for seq in list(self.running):
            if seq.cancel.is_set():
                self._finish(seq, "cancelled")

    def _finish(
        self,
        seq: BatchSequence,
        reason: str,
        error: BaseException | None = None,
        running: bool = True,
    ) -> None:
        seq.stats.stop_reason = reason
        seq.error = error
        if running and seq in self.running:
            self.running.remove(seq)
            self._free.append(seq.slot)
            if seq.prefilling:
                # Its cache holds part of a prompt: nothing a later prompt may reuse.
                self.engine.free(seq.slot)
        seq.done.set()

    def run_all(self, seqs: Sequence[BatchSequence]) -> None:
        """Submit and run these sequences to the end (offline batches, tests)."""
        for s in seqs:
            self.submit(s)
        while self.busy:
            if self.step() == 0 and self.waiting:
                raise PromptError("a waiting request cannot be admitted")
