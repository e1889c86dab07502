# ELBO-RL stage image: pretrain (`python -m stages.pretrain`): pretrains (or reuses) the base model by flow matching.
# Everything it needs is in the shared base image (base.Dockerfile); this image only fixes the entrypoint.
#   build:   containers/build.sh pretrain   (context: the repository root; builds the base first)
#   run:     docker run --rm --gpus all -v $PWD/artifacts:/app/artifacts elborl-pretrain:<version> --help
# BASE_IMAGE: the base image built from this checkout; build.sh passes the tag it built (elborl-base:<version>).
ARG BASE_IMAGE=elborl-base:0.1.0
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="elborl-pretrain" \
      org.opencontainers.image.description="ELBO-RL pipeline stage: pretrain"

USER 1000:1000
ENTRYPOINT ["python", "-m", "stages.pretrain"]
CMD ["--help"]
