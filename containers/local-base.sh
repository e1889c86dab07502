#!/usr/bin/env bash
# Builds the Debian 12 base image where no registry can be reached: a minimal root filesystem from the Debian
# mirror (mmdebstrap) imported into podman. Prints the image's name; does nothing when it exists.
#   BASE_IMAGE=$(containers/local-base.sh) containers/build.sh
# Needs root, mmdebstrap and podman (Debian packages: containers/engine.sh installs them).
set -euo pipefail
TAG=${TAG:-localhost/elborl-debian:12-minbase}
if podman image exists "$TAG"; then
    echo "$TAG"
    exit 0
fi
rootfs=$(mktemp --suffix .tar)
trap 'rm -f "$rootfs"' EXIT
mmdebstrap --quiet --variant=minbase --include=ca-certificates bookworm "$rootfs" >&2
podman import --quiet --change 'CMD ["/bin/bash"]' "$rootfs" "$TAG" >/dev/null
echo "$TAG"
