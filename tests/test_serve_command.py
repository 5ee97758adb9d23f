"""`tpi serve`'s command line (master/serve/command.py) in this process: a bad
argument is one line, found before the port is bound or the model is loaded.
(A busy port: test_hardening.py; a bad key file: test_serve_api_key.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from tpi.cli import cli
from tpi.master.serve.command import _largest_kv_bytes_per_position


@pytest.mark.parametrize(
    "args,says",
    [
        (["--max-request-size", "lots"], "cannot read size 'lots'"),
        (["--kv-budget", "12 parsecs"], "cannot read size '12 parsecs'"),
        (["--port", "70000"], "Invalid value for '--port': 70000 is not in the range 0<=x<=65535"),
        (["--queue-size", "0"], "Invalid value for '--queue-size': 0 is not in the range x>=1"),
        (["--max-batch", "0"], "Invalid value for '--max-batch': 0 is not in the range x>=1"),
    ],
)
def test_a_bad_argument_is_one_line_before_the_model_is_looked_at(tmp_path, args, says):
    # The model does not exist: an error about it would mean it was looked at first.
    r = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path / "none"), *args])
    assert r.exit_code != 0 and "Traceback" not in r.output
    [error] = [line for line in r.output.splitlines() if line.startswith("Error: ")]
    assert error.startswith(f"Error: {says}")


def _loaded(master_bytes: int, workers: dict | None):
    caches = SimpleNamespace(bytes_per_position=master_bytes)
    engine = SimpleNamespace(decoder=SimpleNamespace(caches=caches))
    cluster = None if workers is None else SimpleNamespace(worker_info=workers)
    return SimpleNamespace(engine=engine, cluster=cluster)


def test_a_kv_budget_charges_positions_at_the_fullest_nodes_bytes():
    assert _largest_kv_bytes_per_position(_loaded(100, None)) == 100
    workers = {
        1: {"memory": {"kv_bytes": 256 * 300}, "max_context": 256},  # more KV heads than rank 0
        2: {"memory": {"kv_bytes": 256 * 50}, "max_context": 256},
        3: {"memory": None, "max_context": 256},  # an older worker: no memory reported
        4: {"memory": {"kv_bytes": 999}, "max_context": 0},
    }
    assert _largest_kv_bytes_per_position(_loaded(100, workers)) == 300
    assert _largest_kv_bytes_per_position(_loaded(400, workers)) == 400
