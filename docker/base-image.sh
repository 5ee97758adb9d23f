#!/usr/bin/env bash
# Print the base image to build tpi on, making it first if needed:
#   1. TPI_BASE_IMAGE if set;
#   2. the official python:3.11-slim, if present or pullable;
#   3. else a local Debian bookworm base (its python3 is 3.11 too), made with
#      debootstrap from Debian's package mirror and `docker import`ed. This is
#      for machines that reach package mirrors but no image registry.
#   docker/base-image.sh [--local]     (--local: skip the official image)
set -euo pipefail
source "$(dirname "$0")/common.sh"

OFFICIAL=python:3.11-slim
LOCAL=tpi-base:bookworm
MIRROR=${TPI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# What the Dockerfile expects of a base: python3 with venv, tc, and TLS roots.
PACKAGES=python3,python3-venv,iproute2,ca-certificates

if [ -n "${TPI_BASE_IMAGE:-}" ]; then
    echo "$TPI_BASE_IMAGE"
    exit 0
fi
need_engine
if [ "${1:-}" != "--local" ]; then
    if docker image inspect "$OFFICIAL" >/dev/null 2>&1; then
        echo "$OFFICIAL"
        exit 0
    fi
    say "pulling $OFFICIAL"
    if timeout 120 docker pull -q "$OFFICIAL" >/dev/null 2>&1; then
        echo "$OFFICIAL"
        exit 0
    fi
    say "$OFFICIAL cannot be pulled here; using a local Debian base instead"
fi
if docker image inspect "$LOCAL" >/dev/null 2>&1; then
    echo "$LOCAL"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "making the local base image needs root (debootstrap); run as root or set TPI_BASE_IMAGE"
command -v debootstrap >/dev/null 2>&1 || die "debootstrap is missing: apt-get install debootstrap"
root=$(mktemp -d "${TMPDIR:-/var/tmp}/tpi-rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
say "debootstrap bookworm ($PACKAGES) from $MIRROR into $root"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$MIRROR" >"$root.log" 2>&1 ||
    die "debootstrap failed (last lines of $root.log: $(tail -3 "$root.log" | tr '\n' ' '))"
rm -f "$root.log"
# Package caches and documentation only make the image bigger.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$LOCAL" >/dev/null
say "made $LOCAL ($(docker image inspect -f '{{.Size}}' "$LOCAL" | awk '{printf "%.0f MB", $1/1e6}'))"
echo "$LOCAL"
