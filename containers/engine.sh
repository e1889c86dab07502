#!/usr/bin/env bash
# Installs the container engine the image builds and tests use here: Debian's podman and buildah (rootful, runc),
# and mmdebstrap for the local base image (containers/local-base.sh). A no-op when they are present.
set -euo pipefail
missing=()
for tool in podman buildah mmdebstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "engine.sh: missing ${missing[*]}; as root on Debian: apt-get install podman buildah mmdebstrap runc" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends podman buildah mmdebstrap runc uidmap >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends podman buildah mmdebstrap runc uidmap >/dev/null; }
