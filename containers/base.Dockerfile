# ELBO-RL shared base image: CUDA 12.8 runtime, CPython 3.11, torch 2.14.1 + torchvision 0.29.1 (cu128 builds)
# and the elborl package with its dependencies. Every stage image (containers/<stage>.Dockerfile) is built
# FROM this one, so the heavy layers are shared.
#   build:   containers/build.sh   (or: docker build -f containers/base.Dockerfile -t elborl-base:<version> .)
#   context: the repository root; /.dockerignore keeps the context to what is COPYed below.
# Models, prompts and artifacts are never baked in: stages read them from mounted volumes or S3.

# Plain CUDA runtime (no cuDNN flavour): the torch cu128 wheels bring their own cuDNN, NCCL and cuBLAS;
# the runtime libraries here serve compiled extensions such as mmcv's ops (score.Dockerfile).
# score.Dockerfile's builder uses the devel image of the same CUDA version (12.8.1).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

# Ubuntu 24.04 ships Python 3.12 only and the project needs 3.11 (requires-python >=3.11,<3.12): uv, from its
# pinned release image, installs a pinned CPython build instead of a PPA.
COPY --from=ghcr.io/astral-sh/uv:0.9.26 /uv /usr/local/bin/uv

ARG DEBIAN_FRONTEND=noninteractive
ARG PYTHON_VERSION=3.11.14

ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# ca-certificates: TLS to S3 (artifacts, DVC remote) at run time.
# uid 1000: Ubuntu 24.04 images already hold user `ubuntu` with uid 1000, so it is removed first; the stages
# run as uid 1000 (numeric USER, so Kubernetes' runAsNonRoot can verify it).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && groupadd --gid 1000 elborl \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash elborl \
    && install -d -o 1000 -g 1000 /app \
    && uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" /opt/venv

# Installed interpreter only from here on; every later install keeps torch's pins.
COPY containers/torch-constraints.txt /opt/elborl/torch-constraints.txt
ENV UV_PYTHON_DOWNLOADS=never \
    UV_CONSTRAINT=/opt/elborl/torch-constraints.txt

# torch first, from the PyTorch cu128 index (the build production runs on); its own layer, the largest and
# the least often changed.
RUN uv pip install --index-url https://download.pytorch.org/whl/cu128 -r /opt/elborl/torch-constraints.txt

# The project's dependencies from pyproject.toml alone, so code changes below do not reinstall them.
COPY pyproject.toml README.md /opt/elborl/src/
RUN uv pip install -r /opt/elborl/src/pyproject.toml

# The project itself (a regular, non-editable install into the venv); setuptools' build leftovers removed.
COPY elborl/ /opt/elborl/src/elborl/
COPY stages/ /opt/elborl/src/stages/
RUN uv pip install --no-deps /opt/elborl/src \
    && rm -rf /opt/elborl/src/build /opt/elborl/src/*.egg-info

# Offline at run time: models come from mounted directories or S3, never from a hub; no telemetry.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DO_NOT_TRACK=1 \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MPLBACKEND=Agg

WORKDIR /app
# Stage CLIs read ./params.yaml by default (--params overrides it, e.g. with a mounted file).
COPY --chown=1000:1000 params.yaml /app/params.yaml
# The production presets (configs/sd35m-geneval.yaml: the multi-GPU deployment of prefect.yaml reads it).
COPY --chown=1000:1000 configs/ /app/configs/
# The Prefect flows and deployments (flows/, prefect.yaml): docker/kubernetes work pools run them from /app.
COPY --chown=1000:1000 prefect.yaml /app/prefect.yaml
COPY --chown=1000:1000 flows/ /app/flows/

USER 1000:1000
CMD ["python", "-c", "import elborl, torch; print('elborl base image, torch', torch.__version__)"]
