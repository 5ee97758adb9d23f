"""Who takes part in each step of a cluster, built from the split index.

A split says how the ranks are arranged: one tensor-parallel group of every
rank, or pipeline stages (each a group of ranks that share its layers), and
whether the vocabulary is spread over every rank. From that the master needs
these groups, each with the one broadcaster that starts a step on it and the
one collective that sums its partials:

- `first`: stage 0's workers (every worker, without a pipeline). Their
  allreduces include rank 0's own partials: rank 0's decoder uses
  `first.collective` (or none at all, when it is alone in stage 0).
- `world`: every worker. A vocabulary-parallel step starts here (its token ids
  go to every rank) and the embedding is summed over every rank. Without a
  pipeline, `world` is `first`.
- `later`: each later pipeline stage's group (tpi.master.remote_stage); with
  direct hops, one chain of them (the master only starts stage 1 and hears the
  last stage's output).
- `final`: the ranks outside the last stage, which receive the final hidden
  states for their vocabulary rows (vocabulary-parallel pipelines only).

Every broadcaster and collective shares one step clock: a step is numbered
once, by whichever group starts it, and every allreduce of it carries that number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpi.comm.head_gather import HeadGatherer
from tpi.comm.inbox import Inbox
from tpi.comm.links import WorkerLink
from tpi.comm.star_master import StarMaster
from tpi.comm.step_broadcast import StepBroadcaster, StepClock
from tpi.comm.traffic import AllreduceStats
from tpi.master.remote_stage import RemoteStage
from tpi.model.decoder import Collective, LocalCollective
from tpi.model.partition import Stage


@dataclass
class Group:
    """Workers that start a step together and sum their partials in one star."""

    broadcast: StepBroadcaster
    collective: StarMaster

    @property
    def members(self) -> list[WorkerLink]:
        return self.broadcast.members


@dataclass
class Topology:
    first: Group
    world: Group
    heads: HeadGatherer
    later: list[RemoteStage]
    final: StepBroadcaster | None
    vocab_parallel: bool
    inbox: Inbox  # every worker's messages, filed by kind
    timeout_s: float  # how long a worker may stay silent in a step
    # What rank 0 relays for later stages (their steps and allreduces), counted apart
    # from its own traffic.
    relay_stats: AllreduceStats
    direct: bool = False  # later stages hand their outputs on among themselves
    stages: int = 1  # pipeline stages (a direct chain is one RemoteStage for many)

    @classmethod
    def build(
        cls,
        index: dict,
        inbox: Inbox,
        wire_dtype: torch.dtype,
        timeout_s: float,
        direct: bool = False,
    ) -> Topology:
        """The groups of the split described by `index` (tpi.storage.split), over
        the links of `inbox` (rank r's link is links[r - 1]); `direct`: the later
        stages hand their outputs on among themselves (see direct_hop_pairs)."""
        links = inbox.links.links
        clock, stats = StepClock(), AllreduceStats()
        stages = [Stage.from_dict(d) for d in index.get("stages") or ()]

        def group(members: list[WorkerLink] | None, counters: AllreduceStats) -> Group:
            bc = StepBroadcaster(inbox.links, inbox.session, clock, counters, members=members)
            return Group(bc, StarMaster(inbox, clock, wire_dtype, timeout_s, counters, members))

        def ranks(stage: Stage) -> list[WorkerLink]:
            return [links[r - 1] for r in stage.ranks if r != 0]

        first = group(ranks(stages[0]) if stages else None, stats)
        world = group(None, stats) if stages else first
        relay = AllreduceStats()
        later = []
        if direct and len(stages) > 1:
            entry, last = group(ranks(stages[1]), relay), stages[-1]
            chain = Stage(
                (stages[1].layers[0], last.layers[1]), tuple(r for s in stages[1:] for r in s.ranks)
            )
            others = [links[r - 1] for s in stages[2:] for r in s.ranks]
            exit_ = links[last.lead - 1]
            later.append(
                RemoteStage(
                    len(stages) - 1, chain, entry.members, entry.broadcast, None, exit_, others
                )
            )
        for i, st in enumerate(stages[1:] if not later else [], start=1):
            members = ranks(st)
            g = group(members, relay)
            hub = g.collective if len(members) > 1 else None
            later.append(RemoteStage(i, st, members, g.broadcast, hub))
        vocab_parallel = bool(index.get("vocab_parallel"))
        final = None
        if stages and vocab_parallel:
            last = set(stages[-1].ranks)
            outside = [link for link in links if link.rank not in last]
            final = StepBroadcaster(inbox.links, inbox.session, clock, stats, members=outside)
        heads = HeadGatherer(inbox, clock, len(links) + 1, stats, timeout_s)
        direct = direct and len(stages) > 1
        return cls(
            first,
            world,
            heads,
            later,
            final,
            vocab_parallel,
            inbox,
            timeout_s,
            relay,
            direct,
            max(1, len(stages)),
        )

    @property
    def collective(self) -> StarMaster:
        """Stage 0's allreduce (every worker's, without a pipeline)."""
        return self.first.collective

    def rank0_collective(self) -> Collective:
        """What rank 0's own decoder sums its partials with: stage 0's star, or
        nothing when rank 0 is alone in its stage."""
        return self.first.collective if self.first.members else LocalCollective()


def direct_hop_pairs(stages: list[Stage]) -> list[tuple[int, int]]:
    """The worker pairs that need a direct link for the hops of these pipeline
    stages, as (connecting rank, accepting rank): inside each later stage's group,
    every member and its lead (the group's allreduce); between later stages, the
    lead of one and every rank of the next (the stage's output). Stage 0 is the
    master's: it reaches stage 1 over its own links. The higher rank connects."""
    pairs: set[tuple[int, int]] = set()
    for i, st in enumerate(stages[1:], start=1):
        pairs.update((r, st.lead) for r in st.ranks if r != st.lead)
        if i + 1 < len(stages):
            pairs.update((r, st.lead) for r in stages[i + 1].ranks)
    return sorted((max(a, b), min(a, b)) for a, b in pairs)
