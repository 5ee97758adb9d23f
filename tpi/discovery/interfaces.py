"""Which of this device's addresses discovery uses.

A worker is announced only where it can be reached from another device: on
the address it listens on, or (listening on every interface) on each
non-loopback IPv4 address. A worker bound to loopback is reachable from this
machine only, and is not announced at all. Browsing uses the same addresses,
so nothing is ever sent or heard on loopback.
"""

from __future__ import annotations

import ipaddress
import socket

import ifaddr

ANY_HOSTS = ("0.0.0.0", "*", "::", "[::]", "")


def lan_addresses() -> list[str]:
    """This device's IPv4 addresses, loopback and link-local left out."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue  # IPv6: (address, flowinfo, scope)
            addr = ipaddress.IPv4Address(ip.ip)
            if not (addr.is_loopback or addr.is_link_local) and ip.ip not in found:
                found.append(ip.ip)
    return found


def announce_addresses(listen_host: str) -> list[str]:
    """Where a worker listening on `listen_host` is announced ([]: nowhere)."""
    if listen_host in ANY_HOSTS:
        return lan_addresses()
    host = listen_host.strip("[]")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        try:  # a host name: the address it stands for here
            addr = ipaddress.ip_address(socket.gethostbyname(host))
        except OSError:
            return []
    if addr.version != 4 or addr.is_loopback:
        return []
    return [str(addr)] if str(addr) in lan_addresses() else []
