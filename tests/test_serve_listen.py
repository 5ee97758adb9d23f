"""The server's listening socket (master/serve/listen.py), bound before anything
slow: a refusal is one line naming the address. (A busy port through `tpi serve`:
test_hardening.py.)"""

from __future__ import annotations

import contextlib
import socket

import pytest

from tpi.errors import TpiError
from tpi.master.serve.listen import bind_listener


def test_port_0_listens_on_a_free_port_not_inherited_by_children():
    with contextlib.closing(bind_listener("127.0.0.1", 0)) as sock:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        assert not sock.get_inheritable()  # a worker started later must not hold the port
        with contextlib.closing(socket.create_connection((host, port), 2)):
            pass  # listening already: a client can connect before the model is loaded


def test_an_address_not_on_this_machine_is_one_line():
    with pytest.raises(TpiError, match=r"^cannot listen on 192\.0\.2\.1:8000: .+$"):
        bind_listener("192.0.2.1", 8000)  # TEST-NET-1: never a local address
