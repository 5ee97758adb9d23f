#!/usr/bin/env bash
# Build the tpi image on the base docker/base-image.sh picks, with what this
# machine's pip needs to reach packages (both optional, both only in the build
# stage, see docker/build-extra/README.md):
#   - the CA bundle pip trusts (its `cert` setting), for networks that intercept TLS;
#   - torch wheels from pip's find-links directory (the CPU build), so neither the
#     CPU wheel index nor PyPI's multi-GB CUDA torch is needed.
#   docker/build.sh [--tag tpi:latest] [--ca-bundle FILE] [--wheels DIR]
# (--ca-bundle '' or --wheels '' leaves that input out.)
set -euo pipefail
source "$(dirname "$0")/common.sh"

tag=tpi:latest
ca=$(pip_setting cert)
wheels=$(pip_setting find-links)
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag=$2; shift 2 ;;
        --ca-bundle) ca=$2; shift 2 ;;
        --wheels) wheels=$2; shift 2 ;;
        -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
need_engine
base=$("$TPI_ROOT/docker/base-image.sh")

extra="$TPI_ROOT/docker/build-extra"
find "$extra" -mindepth 1 ! -name README.md -delete
if [ -n "$ca" ]; then
    [ -f "$ca" ] || die "CA bundle $ca not found"
    cp "$ca" "$extra/ca.crt"
    say "packages fetched trusting $ca"
fi
mkdir -p "$extra/wheels"
wheels=${wheels#file://}
if [ -n "$wheels" ] && [ -d "$wheels" ]; then
    for w in "$wheels"/torch-2.13.0*-cp311-*.whl; do
        [ -f "$w" ] || continue
        # A hard link costs nothing; across file systems, copy.
        ln -f "$w" "$extra/wheels/" 2>/dev/null || cp "$w" "$extra/wheels/"
        say "torch from the local wheel $(basename "$w")"
    done
fi

say "building $tag on $base"
start=$(date +%s)
# --force-rm: a failed step leaves no stopped container behind.
docker build --force-rm -f "$TPI_ROOT/docker/Dockerfile" --build-arg "BASE_IMAGE=$base" -t "$tag" "$TPI_ROOT" >&2 ||
    die "the build failed (above). Certificate errors from pip mean this network intercepts TLS: pass the CA bundle to trust with --ca-bundle FILE"
took=$(($(date +%s) - start))
size=$(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')
say "built $tag in ${took} s, image size $size"
