# ELBO-RL stage image: score (`python -m stages.score`): rewards rollouts with GenEval, whose detector in
# production is mmdet's Mask2Former. mmdet needs mmcv's compiled ops (mmcv._ext: NMS, RoIAlign, deformable
# attention on the GPU), and no mmcv 2.1.0 wheel exists for torch 2.14 / CUDA 12.8, so a builder stage compiles
# one and the final stage installs only the wheel (no compiler or CUDA headers in the image that runs).
#   build:   containers/build.sh score   (context: the repository root; builds the base first)
#   knobs:   --build-arg TORCH_CUDA_ARCH_LIST=... --build-arg MAX_JOBS=...
# The Mask2Former checkpoint is not baked in: mount it and pass its path to the stage.
# The same image serves rewards over HTTP for a score stage elsewhere (`stages.score --reward-url URL`):
#   docker run -e ELBORL_REWARD_TOKEN -p 127.0.0.1:8765:8765 --entrypoint python elborl-score:0.1.0 \
#       -m elborl.rewards.service --host 0.0.0.0 --port 8765 --rewards shapes_geneval --preload
# (a token is required on any non-loopback address; GET /healthz answers without one).
ARG BASE_IMAGE=elborl-base:0.1.0

FROM ${BASE_IMAGE} AS base

# ---- builder: mmcv 2.1.0 with CUDA ops -------------------------------------------------------------------
# The devel image of the same CUDA version as the base's runtime image (12.8.1): nvcc and headers match the
# cu128 torch build, which torch.utils.cpp_extension checks.
FROM nvidia/cuda:12.8.1-devel-ubuntu24.04 AS mmcv-build

ARG DEBIAN_FRONTEND=noninteractive
# GPUs the kernels are compiled for: A100 (8.0), A10/A40/RTX 30xx (8.6), L4/L40 (8.9), H100/H200 (9.0);
# +PTX lets newer GPUs JIT-compile the 9.0 code. Each entry adds build time.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0+PTX"
# Parallel nvcc jobs (ninja); each takes 1-2 GB of memory.
ARG MAX_JOBS=4

# g++: the host compiler nvcc and the C++ sources need (the devel image does not guarantee one).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# The base image's interpreter and venv, at the same paths, so the extension is compiled against exactly the
# Python and torch 2.14.1+cu128 the final image runs.
COPY --from=base /usr/local/bin/uv /usr/local/bin/uv
COPY --from=base /opt/python /opt/python
COPY --from=base /opt/venv /opt/venv
COPY --from=base /opt/elborl/torch-constraints.txt /opt/elborl/torch-constraints.txt

# MMCV_WITH_OPS=1 builds mmcv (not mmcv-lite) with its C++/CUDA ops; FORCE_CUDA=1 compiles the CUDA kernels
# although no GPU is visible while building. CC/CXX: the uv-installed CPython was built with clang; gcc is the
# compiler here (and the one nvcc expects as host compiler).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_DOWNLOADS=never \
    UV_NO_CACHE=1 \
    UV_CONSTRAINT=/opt/elborl/torch-constraints.txt \
    CUDA_HOME=/usr/local/cuda \
    CC=gcc \
    CXX=g++ \
    MMCV_WITH_OPS=1 \
    FORCE_CUDA=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS}

WORKDIR /build

# 1. Build tools. setuptools<81: mmcv 2.1.0's setup.py imports pkg_resources, which setuptools 81 removed.
#    ninja: parallel compilation in torch.utils.cpp_extension.
# 2. The mmcv 2.1.0 sdist from PyPI, checked against its sha256 (--no-build-isolation: its metadata step
#    imports torch, which is only in this venv).
# 3. The C++20 patch. torch 2.14's headers need C++20, but mmcv 2.1.0's setup.py hard-codes the standard
#    for both the host compiler and nvcc (-std=c++17 for torch > 1.12, -std=c++14 in older/parrots branches),
#    and its flag overrides torch's own default. Every such flag becomes -std=c++20; the greps fail the build
#    if a new sdist ever stops matching, rather than silently compiling with the old standard.
# 4. Build the wheel against the installed torch (--no-build-isolation) and check it holds the compiled ops.
RUN uv pip install pip==25.1.1 setuptools==80.9.0 wheel==0.45.1 ninja==1.11.1.4 \
    && echo "mmcv==2.1.0 --hash=sha256:d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f" > mmcv-sdist.txt \
    && python -m pip download --no-cache-dir --no-deps --no-binary :all: --no-build-isolation \
        --require-hashes -r mmcv-sdist.txt -d /build \
    && tar -xzf mmcv-2.1.0.tar.gz \
    && sed -i -e 's/-std=c++1[47]/-std=c++20/g' mmcv-2.1.0/setup.py \
    && grep -q -e '-std=c++20' mmcv-2.1.0/setup.py \
    && ! grep -q -e '-std=c++1[47]' mmcv-2.1.0/setup.py \
    && python -m pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels ./mmcv-2.1.0 \
    && python -c "import glob, zipfile; names = zipfile.ZipFile(glob.glob('/wheels/mmcv-2.1.0-*.whl')[0]).namelist(); assert any(n.startswith('mmcv/_ext') for n in names), 'mmcv wheel lacks the compiled ops'"

# ---- final: the base image plus the GenEval detector stack -------------------------------------------------
FROM base

# Root only for the installs below; the stage runs as uid 1000 again.
USER 0
ARG DEBIAN_FRONTEND=noninteractive

# mmengine and mmcv require opencv-python (not -headless), whose cv2 links its bundled Qt, and that needs
# libGL, glib/gthread, libSM/libICE and libXext from the system (checked with readelf on the 4.11 wheel).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0t64 libsm6 libxext6 \
    && rm -rf /var/lib/apt/lists/*

# The compiled mmcv wheel, then the mmdet/mmengine versions GenEval pins (mmdet 3.3.0 accepts mmcv <2.2.0).
# opencv-python pinned to 4.x: left open it resolves to OpenCV 5, which mmcv 2.1.0 predates.
# The import check runs without a GPU: it loads mmcv (and so cv2 and its system libraries) and finds the
# compiled extension module.
COPY --from=mmcv-build /wheels/ /tmp/wheels/
RUN uv pip install /tmp/wheels/mmcv-2.1.0-*.whl mmdet==3.3.0 mmengine==0.10.7 opencv-python==4.11.0.86 \
    && rm -rf /tmp/wheels \
    && python -c "import importlib.util, mmcv, mmdet, mmengine; assert mmcv.__version__ == '2.1.0', mmcv.__version__; assert importlib.util.find_spec('mmcv._ext') is not None, 'no mmcv._ext'"

USER 1000:1000
# the reward service's default port (used only with the entrypoint override above)
EXPOSE 8765
ENTRYPOINT ["python", "-m", "stages.score"]
CMD ["--help"]
