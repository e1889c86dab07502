# ELBO-RL stage image: rollout (`python -m stages.rollout`): samples images from the current policy for a batch of prompts.
# Everything it needs is in the shared base image (base.Dockerfile); this image only fixes the entrypoint.
#   build:   containers/build.sh rollout   (context: the repository root; builds the base first)
#   run:     docker run --rm --gpus all -v $PWD/artifacts:/app/artifacts elborl-rollout:<version> --help
# BASE_IMAGE: the base image built from this checkout; build.sh passes the tag it built (elborl-base:<version>).
ARG BASE_IMAGE=elborl-base:0.1.0
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="elborl-rollout" \
      org.opencontainers.image.description="ELBO-RL pipeline stage: rollout"

USER 1000:1000
ENTRYPOINT ["python", "-m", "stages.rollout"]
CMD ["--help"]
