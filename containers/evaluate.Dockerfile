# ELBO-RL stage image: evaluate (`python -m stages.evaluate`): samples a prompt set with a model and scores it (per-task GenEval table, grid).
# Everything it needs is in the shared base image (base.Dockerfile); this image only fixes the entrypoint.
#   build:   containers/build.sh evaluate   (context: the repository root; builds the base first)
#   run:     docker run --rm --gpus all -v $PWD/artifacts:/app/artifacts elborl-evaluate:<version> --help
# BASE_IMAGE: the base image built from this checkout; build.sh passes the tag it built (elborl-base:<version>).
ARG BASE_IMAGE=elborl-base:0.1.0
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="elborl-evaluate" \
      org.opencontainers.image.description="ELBO-RL pipeline stage: evaluate"

USER 1000:1000
ENTRYPOINT ["python", "-m", "stages.evaluate"]
CMD ["--help"]
