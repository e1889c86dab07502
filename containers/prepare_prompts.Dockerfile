# ELBO-RL stage image: prepare_prompts (`python -m stages.prepare_prompts`): writes the GenEval-format test and training prompt sets.
# Everything it needs is in the shared base image (base.Dockerfile); this image only fixes the entrypoint.
#   build:   containers/build.sh prepare_prompts   (context: the repository root; builds the base first)
#   run:     docker run --rm -v $PWD/artifacts:/app/artifacts elborl-prepare_prompts:<version> --help
# BASE_IMAGE: the base image built from this checkout; build.sh passes the tag it built (elborl-base:<version>).
ARG BASE_IMAGE=elborl-base:0.1.0
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="elborl-prepare_prompts" \
      org.opencontainers.image.description="ELBO-RL pipeline stage: prepare_prompts"

USER 1000:1000
ENTRYPOINT ["python", "-m", "stages.prepare_prompts"]
CMD ["--help"]
