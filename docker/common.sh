# Helpers shared by the docker/*.sh scripts (sourced by bash, not run).

say() { echo "tpi docker: $*" >&2; }
die() {
    echo "tpi docker: $*" >&2
    exit 1
}

# The engine must answer before anything else; say how to get one if it does not.
need_engine() {
    command -v docker >/dev/null 2>&1 ||
        die "no docker command. On Debian/Ubuntu: apt-get install docker.io docker-compose debootstrap, then start the engine (as root: docker/engine.sh)"
    docker info >/dev/null 2>&1 ||
        die "the docker engine does not answer (not running, or no permission on its socket). As root, docker/engine.sh starts one; or: systemctl start docker"
}

# Compose v2 (the docker plugin) where present, else v1 (Debian's docker-compose).
compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose "$@"
    elif command -v docker-compose >/dev/null 2>&1; then
        docker-compose "$@"
    else
        die "no docker compose: install the compose plugin or Debian's docker-compose"
    fi
}

# A pip setting (cert, find-links) from the environment or pip's configuration,
# so a build can reuse what makes pip work on this machine.
pip_setting() {
    local key=$1 env_name py value
    env_name="PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')"
    if [ -n "${!env_name:-}" ]; then
        echo "${!env_name}"
        return
    fi
    for py in "${TPI_ROOT}/.venv/bin/python" python3; do
        if value=$("$py" -m pip config get "global.$key" 2>/dev/null) && [ -n "$value" ]; then
            echo "$value"
            return
        fi
    done
}

TPI_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export TPI_ROOT
