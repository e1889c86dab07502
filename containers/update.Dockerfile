# ELBO-RL stage image: update (`python -m stages.update`): takes the ELBO policy-gradient step on scored rollouts and writes the new checkpoint.
# Everything it needs is in the shared base image (base.Dockerfile); this image only fixes the entrypoint.
#   build:   containers/build.sh update   (context: the repository root; builds the base first)
#   run:     docker run --rm --gpus all -v $PWD/artifacts:/app/artifacts elborl-update:<version> --help
# BASE_IMAGE: the base image built from this checkout; build.sh passes the tag it built (elborl-base:<version>).
ARG BASE_IMAGE=elborl-base:0.1.0
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="elborl-update" \
      org.opencontainers.image.description="ELBO-RL pipeline stage: update"

USER 1000:1000
ENTRYPOINT ["python", "-m", "stages.update"]
CMD ["--help"]
