#!/usr/bin/env bash
# The interop tests' real peers, from Debian's packages, set up once per machine:
#   dpdk-testpmd (dpdk-dev), qemu-system-x86_64 (qemu-system-x86), busybox (busybox-static),
#   and the Linux kernel linux-image-amd64 depends on, fetched with apt-get download and
#   unpacked with dpkg -x into the cache directory (outside the clone).
# Usage: scripts/setup-peers.sh [--print-cache]
# The cache directory is $VIRTIO_NET_REPLICA_CACHE, else /var/cache/virtio-net-replica for root,
# else ${XDG_CACHE_HOME:-~/.cache}/virtio-net-replica.
set -euo pipefail

cache_dir() {
    if [ -n "${VIRTIO_NET_REPLICA_CACHE:-}" ]; then
        echo "$VIRTIO_NET_REPLICA_CACHE"
    elif [ "$(id -u)" = 0 ]; then
        echo /var/cache/virtio-net-replica
    else
        echo "${XDG_CACHE_HOME:-$HOME/.cache}/virtio-net-replica"
    fi
}

say() { echo "setup-peers: $*" >&2; }

can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }

packages() {
    local missing=()
    command -v dpdk-testpmd >/dev/null || missing+=(dpdk-dev)
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    [ -x /bin/busybox ] && file_is_static /bin/busybox || missing+=(busybox-static)
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! can_apt; then
        say "the interop tests need ${missing[*]}; install them (as root: apt-get install ${missing[*]})"
        return 0
    fi
    say "installing ${missing[*]} (Debian packages, once)"
    export DEBIAN_FRONTEND=noninteractive
    local log
    log="$(cache_dir)/apt.log"
    { apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }; } \
        >"$log" 2>&1 || { tail -n 20 "$log" >&2; say "apt-get failed (log: $log)"; }
}

file_is_static() { ! LC_ALL=C ldd "$1" >/dev/null 2>&1; }

# The kernel package's name: the one linux-image-amd64 depends on (linux-image-6.1.0-N-amd64).
kernel_package() {
    local deps
    deps="$(apt-cache depends linux-image-amd64 2>/dev/null || true)"
    sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' <<<"$deps" | sed -n 1p
}

kernel() {
    local cache pkg dest
    cache="$(cache_dir)"
    pkg="$(kernel_package)"
    if [ -z "$pkg" ]; then
        apt-get update -q >/dev/null 2>&1 || true
        pkg="$(kernel_package)"
    fi
    [ -n "$pkg" ] || { say "apt-cache knows no linux-image-amd64; cannot fetch the guest kernel"; return 0; }
    dest="$cache/$pkg"
    [ -f "$dest/.unpacked" ] && return 0
    say "fetching $pkg into $dest (apt-get download, dpkg -x; once per machine)"
    local work
    work="$(mktemp -d "$cache/.fetch.XXXXXX")"
    if ! (cd "$work" && apt-get download -q "$pkg" >"$work/download.log" 2>&1); then
        tail -n 20 "$work/download.log" >&2
        rm -rf "$work"
        say "apt-get download $pkg failed"
        return 0
    fi
    dpkg -x "$work"/"$pkg"_*.deb "$work/root"
    rm -rf "$dest"
    mkdir -p "$dest"
    mv "$work/root/boot" "$dest/boot"
    mkdir -p "$dest/lib"
    if [ -d "$work/root/lib/modules" ]; then mv "$work/root/lib/modules" "$dest/lib/modules"; else mv "$work/root/usr/lib/modules" "$dest/lib/modules"; fi
    rm -rf "$work"
    touch "$dest/.unpacked"
}

main() {
    local cache
    cache="$(cache_dir)"
    if [ "${1:-}" = --print-cache ]; then
        echo "$cache"
        return 0
    fi
    mkdir -p "$cache"
    packages
    kernel
}

main "$@"
