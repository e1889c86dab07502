#!/usr/bin/env bash
# Builds the ELBO-RL images: the shared base first, then one image per pipeline stage, tagged
# elborl-<stage>:<version> (version from pyproject.toml unless VERSION is set).
#   containers/build.sh                 # base + every stage
#   containers/build.sh score update    # base + the named stages
# Environment: ENGINE=docker|podman (default: docker when its daemon answers, else podman),
#   BASE_IMAGE=... (the Debian 12 image under everything; default base.Dockerfile's, Docker Hub's
#   debian:12.12-slim; without a registry: BASE_IMAGE=$(containers/local-base.sh)),
#   VERSION=..., BUILD_ARGS="..." (extra arguments for every build, e.g. "--build-arg MAX_JOBS=8").
# Needs PyPI (or a mirror pip is configured for). Prints each image's size and build time.
set -euo pipefail
cd "$(dirname "$0")/.."

STAGES=(prepare_prompts pretrain rollout score update evaluate)

if [ -z "${ENGINE:-}" ]; then
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        ENGINE=docker
    elif command -v podman >/dev/null 2>&1; then
        ENGINE=podman
    else
        echo "build.sh: no container engine: need docker (with a running daemon) or podman" >&2
        exit 1
    fi
fi

VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)}
[ -n "$VERSION" ] || { echo "build.sh: no version in pyproject.toml" >&2; exit 1; }

# podman/buildah default to the OCI image format; the docker format keeps every Dockerfile field
# (e.g. SHELL, HEALTHCHECK) and is what registries and Kubernetes nodes expect anyway.
engine_args=()
# podman: RUN steps in a chroot (no nested user namespaces needed); pip trusts the host's CA bundle, which holds
# any TLS-intercepting proxy's certificate (mounted for the build only, in no layer)
[ "$ENGINE" = podman ] && engine_args+=(--format docker --isolation chroot
    --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
base_args=()
[ -n "${BASE_IMAGE:-}" ] && base_args+=(--build-arg "BASE_IMAGE=${BASE_IMAGE}")
read -r -a extra_args <<< "${BUILD_ARGS:-}"

if [ $# -gt 0 ]; then
    for stage in "$@"; do
        [ -f "containers/${stage}.Dockerfile" ] || { echo "build.sh: unknown stage '$stage' (stages: ${STAGES[*]})" >&2; exit 1; }
    done
    STAGES=("$@")
fi

report=()
build() {  # build <dockerfile> <tag> [args...]
    local file=$1 tag=$2 start size
    shift 2
    echo "==> $ENGINE build -f $file -t $tag" >&2
    start=$SECONDS
    "$ENGINE" build "${engine_args[@]}" "${extra_args[@]}" "$@" -f "$file" -t "$tag" .
    size=$("$ENGINE" image inspect --format '{{.Size}}' "$tag")
    report+=("$(printf '%-28s %8.2f GB %6d s' "$tag" "$(echo "$size / 1000000000" | bc -l)" $((SECONDS - start)))")
}

ELBORL_BASE="elborl-base:${VERSION}"
build containers/base.Dockerfile "$ELBORL_BASE" "${base_args[@]}"
for stage in "${STAGES[@]}"; do
    build "containers/${stage}.Dockerfile" "elborl-${stage}:${VERSION}" --build-arg "BASE_IMAGE=${ELBORL_BASE}"
done
printf 'built (size, build time):\n' >&2
printf '  %s\n' "${report[@]}" >&2
