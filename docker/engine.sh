#!/usr/bin/env bash
# Get a docker engine answering on this machine (as root, on Debian or Ubuntu):
# install Debian's docker.io, docker-compose and debootstrap where missing, then
# start dockerd (overlay2, else vfs) unless an engine already answers.
#   docker/engine.sh          exit 0 once the engine answers, 1 with the reason
#   docker/engine.sh --stop   stop the dockerd this script started (if any)
set -euo pipefail
source "$(dirname "$0")/common.sh"

STARTED=/run/tpi-dockerd.pid # only a dockerd we started is ours to stop
LOG=/var/log/tpi-dockerd.log

if [ "${1:-}" = --stop ]; then
    [ -f "$STARTED" ] || exit 0
    pid=$(cat "$STARTED")
    rm -f "$STARTED"
    kill "$pid" 2>/dev/null || exit 0
    for _ in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || { say "dockerd stopped"; exit 0; }
        sleep 0.5
    done
    die "dockerd ($pid) did not stop within 30 s"
fi

if docker info >/dev/null 2>&1; then
    exit 0
fi
[ "$(id -u)" = 0 ] || die "no docker engine answers, and starting one needs root"
missing=""
command -v dockerd >/dev/null 2>&1 || missing="$missing docker.io"
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || missing="$missing docker-compose"
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
if [ -n "$missing" ]; then
    command -v apt-get >/dev/null 2>&1 || die "install$missing (no apt-get here)"
    say "installing$missing"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } >"$LOG.apt" 2>&1 ||
        die "apt-get install$missing failed (see $LOG.apt)"
fi

# overlay2 where the file system allows it (fast, small); vfs always works.
for driver in overlay2 vfs; do
    dockerd --storage-driver="$driver" >>"$LOG" 2>&1 &
    pid=$!
    for _ in $(seq 60); do
        if docker info >/dev/null 2>&1; then
            echo "$pid" >"$STARTED"
            say "dockerd started (storage driver $driver, log $LOG)"
            exit 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    say "dockerd with $driver did not come up (see $LOG)"
done
die "no docker engine could be started here (see $LOG)"
