# ELBO-RL shared base image: Debian 12, CPython 3.11, torch 2.14.1 + torchvision 0.29.1 and the elborl package
# with its dependencies. Every stage image (containers/<stage>.Dockerfile) is built FROM this one, so the heavy
# layers are shared.
#   build:   containers/build.sh   (or: podman/docker build -f containers/base.Dockerfile -t elborl-base:<version> .)
#   context: the repository root; /.dockerignore keeps the context to what is COPYed below.
# Models, prompts and artifacts are never baked in: stages read them from mounted volumes or S3.
#
# BASE_IMAGE is the only thing that differs between builds: Docker Hub's Debian 12 in production, a Debian 12
# root filesystem built offline with mmdebstrap where no registry can be reached (containers/local-base.sh).
# No CUDA base image is needed: torch's wheels bring the CUDA runtime, cuDNN, NCCL and cuBLAS as nvidia-*
# packages, and the NVIDIA container runtime adds the driver (torch 2.14.1 from PyPI is a CUDA 13.0 build:
# driver >= 580 on the GPU nodes).
ARG BASE_IMAGE=debian:12.12-slim
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Debian 12's Python is the 3.11 the project needs (requires-python >=3.11,<3.12).
# ca-certificates: TLS to S3 (artifacts, DVC remote) at run time. The stages run as uid 1000 (numeric USER, so
# Kubernetes' runAsNonRoot can verify it).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 elborl \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash elborl \
    && install -d -o 1000 -g 1000 /app \
    && python3 -m venv /opt/venv

# torch first, its own layer (the largest and the least often changed), then the project's other dependencies,
# before the code, so code changes reinstall neither. The locks (containers/lock.py) hold the whole closure at the
# versions the tests ran against, so nothing is resolved here.
COPY containers/torch.lock /opt/elborl/torch.lock
RUN pip install --no-deps -r /opt/elborl/torch.lock
COPY containers/requirements.lock /opt/elborl/requirements.lock
RUN pip install --no-deps -r /opt/elborl/requirements.lock

COPY pyproject.toml README.md /opt/elborl/src/
# The project itself (a regular, non-editable install into the venv); setuptools' build leftovers removed.
COPY elborl/ /opt/elborl/src/elborl/
COPY stages/ /opt/elborl/src/stages/
RUN pip install --no-deps /opt/elborl/src \
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
