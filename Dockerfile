# One image for every Kubeflow step. CPU build by default; GPU build for the train node pool. Tag it
# with the tag the compiled pipeline names (it follows the code: `python -c "from mltag.kubeflow.image
# import image_tag; print(image_tag())"`), and give the version git would (no .git in the context):
#   TAG=$(python -c "from mltag.kubeflow.image import image_tag; print(image_tag())")
#   docker build --build-arg VERSION="$(python -m setuptools_scm)" -t REGISTRY/mltag:$TAG .
#   docker build --build-arg TF_VARIANT=gpu --build-arg VERSION=... -t REGISTRY/mltag:$TAG-gpu .
# The built-in backbones named in BACKBONES are built and converted for LiteRT (fp32 and dynamic range,
# which register quantizes) at their own input
# sizes (all six by default, the _ms ones too, and the default handle's lite2_ms+colour): --build-arg
# BACKBONES="efficientnet_lite0" for a smaller image.
# A vector store or dataset in a bucket needs its fsspec filesystem, pinned by you:
#   docker build --build-arg STORAGE_PKGS="gcsfs==2026.9.0" -t REGISTRY/mltag:0.1.0 .
FROM python:3.11.11-slim-bookworm

ARG TF_VARIANT=cpu
ARG STORAGE_PKGS=""
ARG VERSION=0.1.0
ARG BACKBONES="efficientnet_lite0 efficientnet_lite1 efficientnet_lite2 efficientnet_lite0_ms efficientnet_lite1_ms efficientnet_lite2_ms efficientnet_lite2_ms+colour"
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
RUN SETUPTOOLS_SCM_PRETEND_VERSION="$VERSION" pip install --no-cache-dir --no-deps .

USER 10001
WORKDIR /home/mltag
# Build the built-in backbones and their LiteRT conversions (each at its own input size) once into
# the image, where the components look for them (MLTAG_BACKBONE_CACHE).
ENV MLTAG_BACKBONE_CACHE=/home/mltag/.mltag-cache/backbones
# BACKBONES is a list of names on purpose: one word each.
# hadolint ignore=SC2086
RUN for name in $BACKBONES; do mltag backbone build "$name"; done

CMD ["mltag", "--help"]
