#!/usr/bin/env bash
# Installs the container engine the image builds and tests use here: Debian's podman and buildah (rootful),
# and mmdebstrap for the local base image (containers/local-base.sh). A no-op when they are present and work.
#
# In an unprivileged sandbox (a container without CAP_SYS_RESOURCE) podman's default runtime, crun, cannot raise
# a container's file and process limits and refuses to start anything. There this script adds a podman drop-in
# (runc, limits the sandbox allows), which also applies to containers created through podman's Docker-compatible
# socket (a Prefect docker worker), where no command-line flag can be passed.
set -euo pipefail
DROP_IN=/etc/containers/containers.conf.d/50-elborl-sandbox.conf

missing=()
for tool in podman buildah mmdebstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "engine.sh: missing ${missing[*]}; as root on Debian: apt-get install podman buildah mmdebstrap runc" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends podman buildah mmdebstrap runc uidmap >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends podman buildah mmdebstrap runc uidmap >/dev/null; }
fi

# Probe: start nothing but the runtime (the host's root as the container's, so no image is needed).
if [ ! -f "$DROP_IN" ] && ! probe=$(podman run --rm --rootfs / /bin/true 2>&1) && [[ $probe == *setrlimit* ]]; then
    [ "$(id -u)" = 0 ] || { echo "engine.sh: podman cannot set container limits here ($probe); as root, write $DROP_IN" >&2; exit 1; }
    mkdir -p "$(dirname "$DROP_IN")"
    printf '%s\n' '# Written by elborl containers/engine.sh: crun could not set rlimits in this sandbox.' \
        '[containers]' 'default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]' '' '[engine]' 'runtime = "runc"' \
        > "$DROP_IN"
    echo "engine.sh: podman uses runc with nofile/nproc 4096 here ($DROP_IN)" >&2
fi
