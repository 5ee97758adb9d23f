#!/bin/sh
# Decide how this container's link is shaped, apply tc when that is the way, and
# print the method on stdout as one word (the entrypoint acts on it):
#   netem  tc netem delays and rate-limits this container's egress
#   relay  no netem here (kernel without it, or no NET_ADMIN): the master puts the
#          user-space link shaper in front of each worker instead, no tc
#   tbf    TPI_LINK_METHOD=netem but no netem: bandwidth only, latency NOT emulated
#   none   nothing to shape, or no way to
# Settings (environment):
#   TPI_LINK_LATENCY    one-way delay, e.g. 5ms
#   TPI_LINK_BANDWIDTH  rate, e.g. 100mbit
#   TPI_LINK_METHOD     auto (netem where it works, else relay) | netem | relay
#   TPI_LINK_DEV        interface (default eth0)
# netem delays each container's egress, the relay each direction of a link: either
# way a round trip between master and worker costs 2 x latency.
set -u
dev="${TPI_LINK_DEV:-eth0}"
latency="${TPI_LINK_LATENCY:-}"
rate="${TPI_LINK_BANDWIDTH:-}"
method="${TPI_LINK_METHOD:-auto}"
relay_note="the master shapes its links to the workers with the user-space relay"

case "$method" in
    auto | netem | relay) ;;
    *)
        echo "tpi: TPI_LINK_METHOD must be auto, netem or relay, not '$method'" >&2
        exit 2
        ;;
esac
if [ -z "$latency$rate" ]; then
    echo none
    exit 0
fi
if [ "$method" = relay ]; then
    echo "tpi: link method relay (asked for): $relay_note" >&2
    echo relay
    exit 0
fi
if ! command -v tc >/dev/null 2>&1; then
    err="tc not found"
elif err=$(tc qdisc replace dev "$dev" root netem ${latency:+delay "$latency"} ${rate:+rate "$rate"} 2>&1); then
    echo "tpi: link method netem: $dev shaped:${latency:+ delay $latency}${rate:+ rate $rate}" >&2
    echo netem
    exit 0
fi
if [ "$method" = auto ]; then
    echo "tpi: link method relay: netem unavailable ($err); $relay_note" >&2
    echo relay
    exit 0
fi
echo "tpi: netem unavailable ($err)" >&2
if [ -n "$rate" ] && err=$(tc qdisc replace dev "$dev" root tbf rate "$rate" burst 32kbit latency 400ms 2>&1); then
    echo "tpi: link method tbf: bandwidth $rate shaped; latency NOT emulated" >&2
    echo tbf
else
    echo "tpi: link NOT shaped (${err:-no bandwidth given}); does the container have cap_add NET_ADMIN?" >&2
    echo none
fi
exit 0
