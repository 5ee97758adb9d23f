#!/usr/bin/env bash
# The emulated cluster in one command: build the image (on a local base where no
# registry is reachable), start a master and N workers with compose, each with a
# memory and CPU cap and a shaped link, wait until the master is healthy, print
# its URL. Stop it with docker/down.sh (same --project).
#   docker/up.sh [--workers 3] [--arm-workers 0] [--mem-limit 4g] [--cpus 1.0]
#                [--latency 5ms] [--bandwidth 100mbit] [--port 8000] [--project tpi]
#                [--no-build] [--timeout 900]
# --arm-workers N (or TPI_ARM_WORKERS=N): the last N workers run on linux/arm64, under
# qemu on an x86 host (image tpi:arm64, docker/build-arm64.sh).
# Other settings pass through the environment (TPI_MEMORY_BUDGET, TPI_WINDOW,
# TPI_MODEL, TPI_QUANT, TPI_CURVE, TPI_LINK_METHOD, TPI_PP / TPI_STAGES; see
# docker-compose.yml).
set -euo pipefail
source "$(dirname "$0")/common.sh"

workers=3 project=tpi build=1 timeout=900 arm=${TPI_ARM_WORKERS:-0}
while [ $# -gt 0 ]; do
    case "$1" in
        --workers) workers=$2; shift 2 ;;
        --arm-workers) arm=$2; shift 2 ;;
        --mem-limit) export TPI_MEM_LIMIT=$2; shift 2 ;;
        --cpus) export TPI_CPUS=$2; shift 2 ;;
        --latency) export TPI_LINK_LATENCY=$2; shift 2 ;;
        --bandwidth) export TPI_LINK_BANDWIDTH=$2; shift 2 ;;
        --port) export TPI_HTTP_PORT=$2; shift 2 ;;
        --project) project=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --timeout) timeout=$2; shift 2 ;;
        -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive number, not '$workers'"
[[ "$arm" =~ ^[0-9]+$ ]] && [ "$arm" -le "$workers" ] ||
    die "--arm-workers must be a number from 0 to --workers ($workers), not '$arm'"
need_engine
if [ "$build" = 1 ] || ! docker image inspect tpi:latest >/dev/null 2>&1; then
    "$TPI_ROOT/docker/build.sh"
fi
if [ "$arm" -gt 0 ] && { [ "$build" = 1 ] || ! docker image inspect tpi:arm64 >/dev/null 2>&1; }; then
    "$TPI_ROOT/docker/build-arm64.sh"
fi

# A compose file for this N beside the committed one (relative paths hold).
file="$TPI_ROOT/docker/.compose-$project.yml"
python3 "$TPI_ROOT/docker/make_compose.py" --workers "$workers" --arm-workers "$arm" >"$file"
dc() { compose -p "$project" -f "$file" "$@"; }

start=$(date +%s)
say "starting project $project: master + $workers workers (memory ${TPI_MEM_LIMIT:-4g}," \
    "${TPI_CPUS:-1.0} CPUs, link ${TPI_LINK_LATENCY:-5ms} / ${TPI_LINK_BANDWIDTH:-100mbit} each)"
# Waits for the prepare step (keyring, model split) before starting the nodes.
if ! dc up -d --no-build >&2; then
    dc logs --no-color --tail 20 prepare >&2 || true
    die "compose up failed (its output and the prepare step's last lines are above); docker/down.sh --project $project cleans up"
fi

master=$(dc ps -q master)
[ -n "$master" ] || die "no master container"
deadline=$((SECONDS + timeout))
while :; do
    health=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$master")
    [ "$health" = "running healthy" ] && break
    for c in $(dc ps -q); do
        read -r name state code < <(docker inspect -f '{{.Name}} {{.State.Status}} {{.State.ExitCode}}' "$c")
        case "$name" in *prepare*) [ "$code" = 0 ] && continue ;; esac
        if [ "$state" = exited ] || [ "$state" = dead ]; then
            docker logs --tail 20 "$c" >&2 || true
            die "${name#/} stopped (exit code $code) before the master was healthy; docker/down.sh --project $project cleans up"
        fi
    done
    [ "$SECONDS" -lt "$deadline" ] ||
        die "the master is not healthy after ${timeout} s (docker logs $master); docker/down.sh --project $project cleans up"
    sleep 2
done

say "healthy after $(($(date +%s) - start)) s"
docker logs "$master" 2>&1 | grep -E '^tpi: link' | sed 's/^/  /' >&2 || true
echo "http://127.0.0.1:${TPI_HTTP_PORT:-8000}"
