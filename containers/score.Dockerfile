# ELBO-RL stage image: score (`python -m stages.score`): rewards rollouts; with the GenEval reward its detector is
# mmdet's Mask2Former, so this image adds the `geneval` extra (mmdet, mmengine, mmcv-lite) to the base.
# mmcv-lite has no compiled ops (mmcv._ext) and needs none here: Mask2Former's deformable attention takes mmcv's
# pure-PyTorch path, on the GPU too, and its point sampling is grid_sample (elborl/geneval/mask2former.py installs
# the stand-in module that makes mmdet importable). So no compiler, CUDA toolkit or mmcv build is involved.
#   build:   containers/build.sh score   (context: the repository root; builds the base first)
# The Mask2Former checkpoint is not baked in: mount it (or give an s3:// URI) through rewards.paths.geneval.
# The same image serves rewards over HTTP for a score stage elsewhere (`stages.score --reward-url URL`):
#   docker run -e ELBORL_REWARD_TOKEN -p 127.0.0.1:8765:8765 --entrypoint python elborl-score:0.1.0 \
#       -m elborl.rewards.service --host 0.0.0.0 --port 8765 --rewards shapes_geneval --preload
# (a token is required on any non-loopback address; GET /healthz answers without one).
# BASE_IMAGE: the base image built from this checkout; build.sh passes the tag it built (elborl-base:<version>).
ARG BASE_IMAGE=elborl-base:0.1.0
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="elborl-score" \
      org.opencontainers.image.description="ELBO-RL pipeline stage: score (and the reward service)"

# Root only for the install; the lock (containers/lock.py) is the extra's closure beyond the base's, at the
# versions the tests ran against. The import check loads mmdet the way the reward does; the caches that import
# writes (yapf's grammar, matplotlib's font list, torch's compiler scratch) stay out of the layer.
USER 0
COPY containers/geneval.lock /opt/elborl/geneval.lock
RUN pip install --no-cache-dir --no-deps -r /opt/elborl/geneval.lock \
    && python -c "from elborl.geneval.mask2former import install_mmcv_ext_stub; install_mmcv_ext_stub(); import mmdet.apis" \
    && rm -rf /root/.cache /tmp/*

USER 1000:1000
# the reward service's default port (used only with the entrypoint override above)
EXPOSE 8765
ENTRYPOINT ["python", "-m", "stages.score"]
CMD ["--help"]
