#!/usr/bin/env bash
# Build tpi:arm64, the image of a linux/arm64 worker (docker/make_compose.py
# --arm-workers): the arm64 root of tests/arm64_root.py (made once, ~8 min under
# qemu, kept in $TPI_ARM64_ROOT) imported as tpi-base:arm64, then tpi's wheel on top.
# Needs arm64 emulation on an x86 host (docker/arm64-emulation.sh).
#   docker/build-arm64.sh [--tag tpi:arm64]
set -euo pipefail
source "$(dirname "$0")/common.sh"

tag=tpi:arm64
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag=$2; shift 2 ;;
        -h | --help) sed -n '2,6p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
need_engine
[ "$(uname -m)" = aarch64 ] || "$TPI_ROOT/docker/arm64-emulation.sh"
python=${PYTHON:-python3}
[ -x "$TPI_ROOT/.venv/bin/python" ] && python="$TPI_ROOT/.venv/bin/python"
root=$(cd "$TPI_ROOT" && "$python" -c 'from tests import arm64_root; print(arm64_root.build(echo=lambda m: print(m, file=__import__("sys").stderr)))') ||
    die "the arm64 root could not be made (see above)"
if ! docker image inspect tpi-base:arm64 >/dev/null 2>&1; then
    say "importing $root as tpi-base:arm64"
    tar -C "$root" --exclude=./work --exclude=./opt/tpi-app --exclude=./proc --exclude=./dev -c . |
        docker import --platform linux/arm64 --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' - tpi-base:arm64 >/dev/null
fi
extra="$TPI_ROOT/docker/build-extra/arm64"
rm -rf "$extra" && mkdir -p "$extra"
"$python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$extra" "$TPI_ROOT" >&2 ||
    die "building tpi's wheel failed"
say "building $tag (linux/arm64)"
docker build --force-rm --platform linux/arm64 -f "$TPI_ROOT/docker/Dockerfile.arm64" -t "$tag" "$TPI_ROOT" >&2 ||
    die "the arm64 build failed (above)"
rm -rf "$extra"
say "built $tag"
