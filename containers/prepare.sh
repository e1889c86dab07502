#!/usr/bin/env bash
# Everything the container tests need on a fresh Debian machine, as root: the engine (containers/engine.sh), the
# Debian base built offline from the mirror (containers/local-base.sh) and every image (containers/build.sh).
# Then ELBORL_CONTAINER_TESTS=1 scripts/test.sh runs the container tests instead of skipping them
# (tests/test_container_images.py, tests/test_docker_pool.py). Prints each step's time.
set -euo pipefail
cd "$(dirname "$0")/.."
step() {  # step <name> <command...>
    local name=$1 start=$SECONDS
    shift
    "$@"
    printf 'prepare.sh: %-12s %4d s\n' "$name" $((SECONDS - start)) >&2
}
step engine bash containers/engine.sh
start=$SECONDS
base=$(containers/local-base.sh)
printf 'prepare.sh: %-12s %4d s (%s)\n' base $((SECONDS - start)) "$base" >&2
BASE_IMAGE=$base step images containers/build.sh
