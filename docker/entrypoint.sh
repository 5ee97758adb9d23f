#!/bin/sh
# Start a tpi node in a container. The first argument is its role:
#   prepare  make the cluster keyring (/models/keys) and split the model for
#            TPI_WORLD ranks into /models/split (shared volume)
#   worker   the worker daemon on port ${TPI_PORT:-5555}, shards from /models/split
#   master   the OpenAI-compatible server against TPI_WORKERS, port 8000
#   other    any tpi command, e.g. "chat" or "bench" (with the master's settings)
# Extra arguments are passed on to the tpi command.
set -eu
role="${1:-worker}"
[ $# -gt 0 ] && shift
# The user-space link shaper's module: the one place the docker files name it.
shaper_module=tpi.emulation.link_shaper

# tc needs root (and NET_ADMIN); the node itself then runs as the unprivileged user.
# shape-link.sh (beside this script) says which link method is active: netem,
# relay, tbf or none.
link_method=$("$(dirname "$0")/shape-link.sh")
if [ "$(id -u)" = "0" ]; then
    mkdir -p "${TPI_HOME}" && chown -R tpi:tpi "$(dirname "${TPI_HOME}")"
    run="setpriv --reuid=tpi --regid=tpi --init-groups --"
else
    run=""
fi

# Without netem, the link shaper `tpi cluster` uses relays this master's traffic to
# each worker, with the latency and bandwidth applied in both directions; the master
# then talks to the relay's local ports. It runs until the container stops. The
# mapping stays in /tmp/tpi-links.json (route -> shaped address) for inspection.
shape_workers() {
    ready="${TMPDIR:-/tmp}/tpi-links.json"
    rm -f "$ready"
    set -- --latency "${TPI_LINK_LATENCY:-0ms}" --ready-file "$ready"
    [ -n "${TPI_LINK_BANDWIDTH:-}" ] && set -- "$@" --bandwidth "${TPI_LINK_BANDWIDTH}"
    for w in $(echo "$TPI_WORKERS" | tr ',' ' '); do
        set -- "$@" --route "$w"
    done
    $run python -m "$shaper_module" "$@" &
    shaper=$!
    tries=0
    while [ ! -f "$ready" ]; do
        if ! kill -0 "$shaper" 2>/dev/null || [ "$tries" -ge 300 ]; then
            echo "tpi: the link shaper did not start" >&2
            exit 1
        fi
        tries=$((tries + 1))
        sleep 0.1
    done
    TPI_WORKERS=$(python -c 'import json, sys
m = json.load(open(sys.argv[1]))
print(",".join(m[w] for w in sys.argv[2].split(",")))' "$ready" "$TPI_WORKERS")
    # The relay carries each worker's control port only: the allreduces stay on it
    # (a direct data link would skip the emulated link).
    export TPI_DATA_LINK=0
    echo "tpi: links to the workers relayed by python -m $shaper_module" \
        "(latency ${TPI_LINK_LATENCY:-0ms} each way, bandwidth ${TPI_LINK_BANDWIDTH:-unlimited}): $TPI_WORKERS" >&2
}

split_dir="${TPI_SPLIT_DIR:-/models/split}"
budget=""
[ -n "${TPI_MEMORY_BUDGET:-}" ] && budget="--memory-budget ${TPI_MEMORY_BUDGET}"
window=""
[ -n "${TPI_WINDOW:-}" ] && window="--window ${TPI_WINDOW}"
# Torch sizes its thread pool by the cores it sees, not by the container's CPU quota;
# threads beyond the quota spin against each other and the other containers. So the
# default is the quota rounded up (cgroup v2 cpu.max or v1 cfs), TPI_THREADS overrides.
quota_threads() {
    if [ -r /sys/fs/cgroup/cpu.max ]; then
        read -r quota period </sys/fs/cgroup/cpu.max
    elif [ -r /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
        quota=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)
        period=$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)
    else
        return 0
    fi
    case "$quota" in max | -1 | "") return 0 ;; esac
    echo $(((quota + period - 1) / period))
}
threads=""
n_threads="${TPI_THREADS:-$(quota_threads)}"
if [ -n "$n_threads" ]; then
    threads="--threads ${n_threads}"
    export OMP_NUM_THREADS="$n_threads"
fi
# The prepare step makes one keyring on the shared volume; every node proves the
# shared secret, and with TPI_CURVE=1 all links are also CurveZMQ-encrypted.
keys="${TPI_KEYS:-/models/keys}"
vocab=""  # TPI_VOCAB_PARALLEL=1: embedding and LM head split by vocabulary rows too
[ "${TPI_VOCAB_PARALLEL:-0}" = "1" ] && vocab="--vocab-parallel"
stages=""  # TPI_STAGES=2,2 (ranks per stage, master first) or TPI_PP=N: a pipeline split
if [ -n "${TPI_PP:-}" ] && [ -n "${TPI_STAGES:-}" ]; then
    echo "tpi docker: set TPI_PP or TPI_STAGES, not both" >&2
    exit 2
fi
[ -n "${TPI_PP:-}" ] && stages="--pp ${TPI_PP}"
[ -n "${TPI_STAGES:-}" ] && stages="--stages ${TPI_STAGES}"
[ -n "${TPI_STAGE_LAYERS:-}" ] && stages="${stages} --stage-layers ${TPI_STAGE_LAYERS}"
security="--secret-file ${keys}/secret"
[ "${TPI_CURVE:-0}" = "1" ] && security="${security} --curve ${keys}"

case "$role" in
    prepare)
        [ -f "${keys}/secret" ] || $run tpi keygen "$keys"
        # shellcheck disable=SC2086
        exec $run tpi split ${TPI_MODEL:-} --world "${TPI_WORLD:?set TPI_WORLD}" --out "$split_dir" \
            --quant "${TPI_QUANT:-none}" $vocab $stages --force "$@"
        ;;
    worker)
        # The compose file names every worker for the master; announcing would only
        # put multicast on the host's bridge.
        # shellcheck disable=SC2086
        exec $run tpi worker --listen "tcp://0.0.0.0:${TPI_PORT:-5555}" --store "$split_dir" \
            --no-accept-push --no-announce $budget $window $threads $security "$@"
        ;;
    master)
        [ "$link_method" = relay ] && shape_workers
        # shellcheck disable=SC2086
        exec $run tpi serve --model "$split_dir" --workers "${TPI_WORKERS:?set TPI_WORKERS}" \
            --host 0.0.0.0 --port 8000 $budget $window $threads $security "$@"
        ;;
    *)
        [ "$link_method" = relay ] && [ -n "${TPI_WORKERS:-}" ] && shape_workers
        # shellcheck disable=SC2086
        exec $run tpi "$role" --model "$split_dir" --workers "${TPI_WORKERS:?set TPI_WORKERS}" $threads $security "$@"
        ;;
esac
