#!/usr/bin/env bash
# Stop and remove everything docker/up.sh started for a project: containers,
# network and the model volume. The image stays cached for the next up.
#   docker/down.sh [--project tpi]
set -euo pipefail
source "$(dirname "$0")/common.sh"

project=tpi
while [ $# -gt 0 ]; do
    case "$1" in
        --project) project=$2; shift 2 ;;
        -h | --help) sed -n '2,4p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
need_engine
file="$TPI_ROOT/docker/.compose-$project.yml"
if [ -f "$file" ]; then
    compose -p "$project" -f "$file" down --volumes --remove-orphans --timeout 5 >&2 || true
    rm -f "$file"
fi
# Whatever compose could not remove (or was started without this file), by label.
label="label=com.docker.compose.project=$project"
ids=$(docker ps -aq --filter "$label")
[ -z "$ids" ] || docker rm -f $ids >/dev/null
ids=$(docker network ls -q --filter "$label")
[ -z "$ids" ] || docker network rm $ids >/dev/null
ids=$(docker volume ls -q --filter "$label")
[ -z "$ids" ] || docker volume rm $ids >/dev/null
say "project $project removed"
