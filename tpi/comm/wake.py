"""Waking the thread that owns the link sockets from another thread.

While a reducer or pipeline router thread owns every link socket, the compute
thread must not touch them; it hands work over a queue and nudges the owner
through an inproc PAIR of its own, which the owner polls with the links."""

from __future__ import annotations

import contextlib
import itertools

import zmq

from tpi.comm.links import LinkSet

_ids = itertools.count()


class WakePair:
    def __init__(self, links: LinkSet, name: str) -> None:
        self.links = links
        address = f"inproc://tpi-{name}-{next(_ids)}"
        self.rx = links.ctx.socket(zmq.PAIR)  # the owner thread's (polled with the links)
        self.rx.bind(address)
        self._tx = links.ctx.socket(zmq.PAIR)  # the compute thread's
        self._tx.connect(address)

    def nudge(self) -> None:
        # A wake-up already queued is enough, and an owner that stopped on an error
        # reads no more: neither may block the compute thread.
        with contextlib.suppress(zmq.Again):
            self._tx.send(b"", zmq.NOBLOCK)

    def drain(self, ready: set[zmq.Socket]) -> None:
        """The owner: read the wake-ups `ready` says are there."""
        if self.rx in ready:
            while self.rx.poll(0):
                self.rx.recv()

    def close(self) -> None:
        self.links.forget((self.rx,))  # its poller would otherwise be kept for good
        self.rx.close(linger=0)
        self._tx.close(linger=0)
