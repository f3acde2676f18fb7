# One image for every Kubeflow step. CPU build by default; GPU build for the train node pool:
#   docker build -t REGISTRY/mltag:0.1.0 .
#   docker build --build-arg TF_VARIANT=gpu -t REGISTRY/mltag:0.1.0-gpu .
# A vector store or dataset in a bucket needs its fsspec filesystem, pinned by you:
#   docker build --build-arg STORAGE_PKGS="gcsfs==2026.9.0" -t REGISTRY/mltag:0.1.0 .
FROM python:3.11.11-slim-bookworm

ARG TF_VARIANT=cpu
ARG STORAGE_PKGS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /opt/mltag
# Dependencies first, from the lock file (`make lock`), so a code change reuses this layer;
# the GPU variant adds TensorFlow's CUDA wheels.
COPY requirements.lock ./
# STORAGE_PKGS is split into packages on purpose, and pinned by whoever builds (see the top).
# hadolint ignore=SC2086,DL3013
RUN pip install --no-cache-dir -r requirements.lock \
    && if [ "$TF_VARIANT" = "gpu" ]; then pip install --no-cache-dir "tensorflow[and-cuda]==2.21.0"; fi \
    && if [ -n "$STORAGE_PKGS" ]; then pip install --no-cache-dir $STORAGE_PKGS; fi \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin mltag

# Then the package itself, without re-resolving anything.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --no-deps .

USER 10001
WORKDIR /home/mltag
# Build the default built-in backbone and its LiteRT conversion once into the image, where the
# components look for them.
ENV MLTAG_BACKBONE_CACHE=/home/mltag/.mltag-cache/backbones
RUN python -c "from mltag.backbone import resolve; from mltag.engine import backbone_engine; \
b = resolve('builtin:efficientnet_lite2', '$MLTAG_BACKBONE_CACHE'); backbone_engine('litert', b, 260, '$MLTAG_BACKBONE_CACHE')"

CMD ["mltag", "--help"]
