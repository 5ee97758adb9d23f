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

# tc needs root (and NET_ADMIN); the node itself then runs as the unprivileged user.
if [ "$(id -u)" = "0" ]; then
    /usr/local/bin/shape-link.sh
    mkdir -p "${TPI_HOME}" && chown -R tpi:tpi "$(dirname "${TPI_HOME}")"
    run="setpriv --reuid=tpi --regid=tpi --init-groups --"
else
    run=""
fi

split_dir="${TPI_SPLIT_DIR:-/models/split}"
budget=""
[ -n "${TPI_MEMORY_BUDGET:-}" ] && budget="--memory-budget ${TPI_MEMORY_BUDGET}"
window=""
[ -n "${TPI_WINDOW:-}" ] && window="--window ${TPI_WINDOW}"
# The prepare step makes one keyring on the shared volume; every node proves the
# shared secret, and with TPI_CURVE=1 all links are also CurveZMQ-encrypted.
keys="${TPI_KEYS:-/models/keys}"
vocab=""  # TPI_VOCAB_PARALLEL=1: embedding and LM head split by vocabulary rows too
[ "${TPI_VOCAB_PARALLEL:-0}" = "1" ] && vocab="--vocab-parallel"
security="--secret-file ${keys}/secret"
[ "${TPI_CURVE:-0}" = "1" ] && security="${security} --curve ${keys}"

case "$role" in
    prepare)
        [ -f "${keys}/secret" ] || $run tpi keygen "$keys"
        # shellcheck disable=SC2086
        exec $run tpi split ${TPI_MODEL:-} --world "${TPI_WORLD:?set TPI_WORLD}" --out "$split_dir" \
            --quant "${TPI_QUANT:-none}" $vocab --force "$@"
        ;;
    worker)
        # shellcheck disable=SC2086
        exec $run tpi worker --listen "tcp://0.0.0.0:${TPI_PORT:-5555}" --store "$split_dir" \
            --no-accept-push $budget $window $security "$@"
        ;;
    master)
        # shellcheck disable=SC2086
        exec $run tpi serve --model "$split_dir" --workers "${TPI_WORKERS:?set TPI_WORKERS}" \
            --host 0.0.0.0 --port 8000 $budget $window $security "$@"
        ;;
    *)
        # shellcheck disable=SC2086
        exec $run tpi "$role" --model "$split_dir" --workers "${TPI_WORKERS:?set TPI_WORKERS}" $security "$@"
        ;;
esac
