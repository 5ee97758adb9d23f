"""`tpi workers`: the workers announced on the local network, and which of them
this cluster can use."""

from __future__ import annotations

import json

import click

from tpi import cli_options as opt


@click.command("workers")
@opt.secret_file(
    "File holding the cluster's shared secret (else $TPI_SECRET): each worker is asked to "
    "prove it, to tell this cluster's workers from others'."
)
@opt.curve("CurveZMQ keys from 'tpi keygen DIR', for workers that require them.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0.5),
    default=None,
    metavar="SECONDS",
    help="How long to listen for announcements (default: $TPI_DISCOVERY_SECONDS, else 3).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per worker.")
def workers(secret_file: str | None, curve_dir: str | None, wait: float | None, as_json: bool):
    """List the workers announced on the local network (mDNS): address, device (cores,
    memory, free disk), whether they answer, whether they know this cluster's secret,
    and whether they are free or serving a master.

    '--workers auto' on generate, chat, serve, bench and plan uses those marked
    'yes, same, free'. Each worker is checked with the start of the usual handshake:
    it proves its secret and is never answered, so listing reserves nothing.
    """
    from tpi.comm.auth import load_secret
    from tpi.comm.curve import CurveKeys
    from tpi.discovery.find import find_workers, wait_seconds

    secret = load_secret(secret_file)
    curve = CurveKeys.load(curve_dir, "master") if curve_dir else None
    seconds = wait or wait_seconds()
    found = find_workers(secret, curve, seconds)
    if as_json:
        for f in found:
            click.echo(json.dumps(_row(f)))
        return
    click.echo(_table(found, seconds))
    if secret is None and found:
        click.echo("(no secret given: set TPI_SECRET or --secret-file to tell whose they are)")


def _row(f) -> dict:
    v, a = f.verdict, f.sighting.advert
    return {
        "address": f.address,
        "name": f.sighting.name,
        "cores": a.device.cores,
        "memory_bytes": a.device.memory_bytes,
        "disk_free_bytes": a.device.disk_free_bytes,
        "data_port": a.data_port,
        "protocol": a.protocol,
        "version": a.version,
        "reachable": v.reachable,
        "secret": v.secret,
        "state": v.state,
        "usable": v.usable,
        "note": v.note,
    }


def _table(found: list, seconds: float) -> str:
    from tpi.discovery.find import describe_verdict

    if not found:
        return f"no workers announced on the network within {seconds:g} s"
    rows = [("ADDRESS", "DEVICE", "REACHABLE", "SECRET", "STATE", "NOTE")]
    for f in found:
        v = f.verdict
        rows.append(
            (
                f.address,
                f.sighting.advert.device.describe(),
                "yes" if v.reachable else "no",
                v.secret,
                v.state,
                "" if v.usable else describe_verdict(v),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows
    ]
    usable = sum(f.verdict.usable for f in found)
    head = f"{len(found)} worker(s) announced, {usable} usable by this cluster:"
    return "\n".join([head, *(ln.rstrip() for ln in lines)])
