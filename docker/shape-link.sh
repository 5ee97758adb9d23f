#!/bin/sh
# Shape this container's egress link with tc, from environment variables:
#   TPI_LINK_LATENCY    one-way delay, e.g. 5ms   (netem)
#   TPI_LINK_BANDWIDTH  rate, e.g. 100mbit        (netem rate, or tbf without netem)
#   TPI_LINK_DEV        interface (default eth0)
# Each container delays its own egress, so a round trip costs 2 x latency.
# Where a facility is missing, say so and keep going unshaped.
set -u
dev="${TPI_LINK_DEV:-eth0}"
latency="${TPI_LINK_LATENCY:-}"
rate="${TPI_LINK_BANDWIDTH:-}"
[ -z "$latency$rate" ] && exit 0
if ! command -v tc >/dev/null 2>&1; then
    echo "tpi: tc not found; link NOT shaped" >&2
    exit 0
fi
args=""
[ -n "$latency" ] && args="$args delay $latency"
[ -n "$rate" ] && args="$args rate $rate"
# shellcheck disable=SC2086
if err=$(tc qdisc replace dev "$dev" root netem $args 2>&1); then
    echo "tpi: link on $dev shaped:$args" >&2
    exit 0
fi
echo "tpi: netem unavailable ($err)" >&2
if [ -n "$rate" ] && err=$(tc qdisc replace dev "$dev" root tbf rate "$rate" burst 32kbit latency 400ms 2>&1); then
    echo "tpi: bandwidth $rate shaped with tbf; latency NOT emulated" >&2
else
    echo "tpi: link NOT shaped (${err:-no bandwidth given}); does the container have cap_add NET_ADMIN?" >&2
fi
exit 0
