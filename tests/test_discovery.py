"""Discovery's parts that need no multicast: what an announcement carries, where
a worker is announced, and the check of a worker's secret (over loopback, with
real worker processes). Announcing and browsing run only in network namespaces
a test makes: tests/test_discovery_netns.py."""

from __future__ import annotations

import pytest

from tests.cluster_helpers import addresses, cluster_model, local_workers
from tpi.comm.wire import PROTOCOL_VERSION
from tpi.discovery.check import check_worker
from tpi.discovery.find import examine, usable_addresses
from tpi.discovery.interfaces import announce_addresses, lan_addresses
from tpi.discovery.record import Advert, DeviceSummary, Sighting

SECRET_ENV = "TPI_SECRET"


def _advert(**kw) -> Advert:
    fields = dict(
        port=5555,
        protocol=PROTOCOL_VERSION,
        version="0.1.0",
        data_port=5556,
        curve=False,
        device=DeviceSummary(4.0, 8 * 2**30, 100 * 2**30),
    )
    return Advert(**{**fields, **kw})


def test_an_announcement_carries_ports_version_and_device_only():
    advert = _advert()
    props = advert.properties()
    assert set(props) == {"proto", "tpi", "curve", "cores", "mem", "disk", "data"}
    # As zeroconf hands them back: bytes.
    raw = {k.encode(): v.encode() for k, v in props.items()}
    assert Advert.from_properties(5555, raw) == advert
    no_data = _advert(data_port=None)
    assert "data" not in no_data.properties()
    assert Advert.from_properties(5555, no_data.properties()) == no_data


def test_another_programs_record_of_the_same_type_is_ignored():
    assert Advert.from_properties(80, {b"path": b"/"}) is None
    assert Advert.from_properties(80, {b"proto": b"x"}) is None


def test_a_worker_on_loopback_is_not_announced():
    assert announce_addresses("127.0.0.1") == []
    assert announce_addresses("localhost") == []
    assert "127.0.0.1" not in announce_addresses("0.0.0.0")
    assert announce_addresses("0.0.0.0") == lan_addresses()
    assert announce_addresses("203.0.113.9") == []  # not an address of this device


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """A worker of this cluster, one of another, and one that runs --insecure."""
    base = tmp_path_factory.mktemp("check")
    other = base / "other-secret"
    other.write_text("another-clusters-secret-0123456789")
    with (
        local_workers(1, base / "ours") as ours,
        local_workers(1, base / "theirs", ["--secret-file", str(other)]) as theirs,
        local_workers(1, base / "open", ["--insecure"]) as open_,
    ):
        yield addresses(ours)[0], addresses(theirs)[0], addresses(open_)[0]


def test_the_check_tells_our_workers_from_anothers(workers, monkeypatch):
    import os

    ours, theirs, open_ = workers
    secret = os.environ[SECRET_ENV].encode()
    assert check_worker(ours, secret).usable
    foreign = check_worker(theirs, secret)
    assert (foreign.reachable, foreign.secret, foreign.usable) == (True, "foreign", False)
    insecure = check_worker(open_, secret)
    assert (insecure.secret, insecure.usable) == ("none", False)
    unknown = check_worker(ours, None)  # we cannot tell without a secret
    assert (unknown.secret, unknown.usable) == ("unknown", False)
    assert "secret" in unknown.note


def test_a_check_reserves_nothing_and_a_busy_worker_says_so(workers, llama_dir):
    import os

    ours, _, open_ = workers
    secret = os.environ[SECRET_ENV].encode()
    for _ in range(3):  # unanswered challenges: the worker stays free for a real master
        assert check_worker(ours, secret).usable
    with cluster_model(llama_dir, [ours]):
        busy = check_worker(ours, secret)
        assert (busy.state, busy.usable) == ("busy", False)
    # The insecure worker's check started a session and ended it at once.
    with cluster_model(llama_dir, [open_], insecure=True):
        pass


def test_a_stopped_worker_is_unreachable_and_the_announcement_decides_early(workers):
    import os

    ours, *_ = workers
    secret = os.environ[SECRET_ENV].encode()
    dead = check_worker("127.0.0.1:1", secret)
    assert (dead.reachable, dead.usable) == (False, False)
    host, port = ours.rsplit(":", 1)
    seen = [
        Sighting("ours", host, _advert(port=int(port))),
        Sighting("old", host, _advert(port=int(port), protocol=PROTOCOL_VERSION - 1)),
        Sighting("curved", host, _advert(port=int(port), curve=True)),
    ]
    found = examine(seen, secret, None)
    notes = []
    assert usable_addresses(found, notes.append) == [ours]
    assert len(notes) == 2
    assert "protocol" in notes[0] and "--curve" in notes[1]


def test_workers_auto_without_a_secret_is_one_line_before_listening(llama_dir, monkeypatch):
    from click.testing import CliRunner

    from tpi.cli import cli

    def no_browsing(*args, **kwargs):
        raise AssertionError("listened on the network without a secret")

    monkeypatch.setattr("tpi.master.auto_workers.Browser", no_browsing)
    args = ["generate", "--model", str(llama_dir), "--workers", "auto", "-n", "2", "hi"]
    res = CliRunner().invoke(cli, [*args, "--insecure"])
    assert res.exit_code == 1 and "--workers auto uses only workers that prove" in res.output
    monkeypatch.delenv(SECRET_ENV)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "shared secret" in res.output
    assert "Traceback" not in res.output


def test_an_insecure_or_loopback_worker_is_never_announced(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from tpi.worker import announce
    from tpi.worker.options import WorkerOptions

    def no_announcing(*args, **kwargs):
        raise AssertionError("announced")

    monkeypatch.setattr(announce, "Announcer", no_announcing)
    monkeypatch.setattr(announce, "announce_addresses", lambda host: ["192.0.2.7"])
    insecure = SimpleNamespace(
        address="tcp://0.0.0.0:5555", options=WorkerOptions(secret=None), data_listener=None
    )
    assert announce.start_announcing(insecure, tmp_path) is None
    monkeypatch.setattr(announce, "announce_addresses", lambda host: [])  # loopback's answer
    loopback = SimpleNamespace(
        address="tcp://127.0.0.1:5555", options=WorkerOptions(secret=b"s" * 16), data_listener=None
    )
    assert announce.start_announcing(loopback, tmp_path) is None
