#!/usr/bin/env bash
# ./run.sh          the end-to-end demo
# ./run.sh test     the test suite
# ./run.sh ARGS...  vreplica ARGS...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
venv="$here/.venv"
py="$venv/bin/python"

extras="test"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
if [ ! -x "$py" ] || [ "$(cat "$venv/.installed" 2>/dev/null)" != "$want" ]; then
    echo "run.sh: setting up $venv (first use or pyproject.toml changed)" >&2
    python3 -m venv "$venv"
    log="$venv/install.log"
    if ! { "$py" -m pip install --upgrade pip && "$py" -m pip install -e ".[$extras]"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "run.sh: installing the project failed (full log: $log)" >&2
        exit 1
    fi
    echo "$want" > "$venv/.installed"
fi

# POSIX message queues are only visible (and checkable for leftovers) once mqueue is mounted.
if [ "$(id -u)" = 0 ] && ! mountpoint -q /dev/mqueue 2>/dev/null; then
    mkdir -p /dev/mqueue && mount -t mqueue none /dev/mqueue 2>/dev/null || true
fi

# The tests' system tools (README, "Tests"): gcc and the kernel's UAPI headers for the C layout
# checks, tshark to read the pcaps' checksums. Installed once, as root, from Debian's packages.
system_tools() {
    local missing=()
    command -v gcc >/dev/null || missing+=(gcc libc6-dev)
    [ -f /usr/include/linux/virtio_ring.h ] || missing+=(linux-libc-dev)
    command -v tshark >/dev/null || missing+=(tshark)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "run.sh: the tests need ${missing[*]}; install them (as root: apt-get install ${missing[*]})" >&2
        return 0
    fi
    echo "run.sh: installing ${missing[*]} (Debian packages, once)" >&2
    export DEBIAN_FRONTEND=noninteractive
    local log="$venv/apt.log"
    { apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }; } \
        >"$log" 2>&1 || { tail -n 20 "$log" >&2; echo "run.sh: apt-get failed (log: $log)" >&2; }
}

# what the user typed to get here: the commands vreplica prints for them to type use it
export VREPLICA_PROG="$0"

case "${1:-}" in
    "") exec "$py" -m vreplica.cli demo ;;
    test) shift; system_tools; unset VREPLICA_PROG; exec "$py" -m pytest "$@" ;;
    bench) shift; exec "$py" -m vreplica.cli bench "$@" ;;
    fuzz) shift; exec "$py" -m vreplica.cli fuzz "$@" ;;
    stress) shift; exec "$py" -m vreplica.cli stress "$@" ;;
    *) exec "$py" -m vreplica.cli "$@" ;;
esac
