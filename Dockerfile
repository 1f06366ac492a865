# syntax=docker/dockerfile:1
# comfy-endpoint for GPU platforms.
#
# Base: the official PyTorch runtime image, pinned by tag, whose bundled torch is 2.13.0+cu126, the version the
# package pins (torch==2.13.0 accepts the +cu126 build, so pip keeps the base's CUDA torch and installs nothing
# over it; the build checks that). CUDA 12.6 runs on drivers >= 525 (CUDA minor-version compatibility). For a
# reproducible build, pin the digest too: FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime@sha256:<digest>.
#
#   docker build -t comfy-endpoint .
#   docker build -t comfy-endpoint --build-arg PRELOAD=checkpoints/sd_xl_base_1.0.safetensors .   # models baked in
#   docker run --gpus all -p 8188:8188 -v hub-cache:/cache comfy-endpoint
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

# -- build: the package's wheel (setuptools and the source tree stay in this stage) ----------------------------
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY handler handler
COPY engine engine
COPY nodes nodes
COPY container container
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- the image: the wheel and its runtime dependencies, a non-root user -----------------------------------------
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    COMFY_ENDPOINT_DATA_DIR=/data

RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install /wheels/*.whl \
 && python -c "import torch; v = torch.__version__; assert v.split('+')[0] == '2.13.0' and torch.version.cuda, v" \
 && useradd --create-home --uid 1000 --user-group comfy \
 && mkdir -p /data /cache/huggingface \
 && chown -R comfy:comfy /data /cache

USER comfy
WORKDIR /home/comfy

# Models baked into the image, for platforms without volumes: folder/name entries as for --preload
# (known models, or hf:// references of the orgs in HUB_ALLOW). A gated repo's token comes as a build secret
# (docker build --secret id=hf_token,env=HF_TOKEN ...), so that it stays out of the image's layers.
# This runs before the VOLUME line: content written into a volume path after VOLUME would be discarded.
ARG PRELOAD=""
ARG HUB_ALLOW=""
RUN --mount=type=secret,id=hf_token,uid=1000 \
    if [ -n "$PRELOAD" ]; then \
      HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" \
      COMFY_ENDPOINT_HUB_ALLOW="$HUB_ALLOW" \
      comfy-endpoint prefetch --preload "$PRELOAD"; \
    fi
ENV COMFY_ENDPOINT_PRELOAD=${PRELOAD}

VOLUME ["/data", "/cache"]
EXPOSE 8188
# the port the entrypoint listens on: the platform's PORT, else COMFY_ENDPOINT_PORT, else 8188
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
    CMD python -c "import os, urllib.request as u; p = os.environ.get('PORT') or \
os.environ.get('COMFY_ENDPOINT_PORT') or '8188'; u.urlopen(f'http://127.0.0.1:{p}/healthz', timeout=2)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "container.entrypoint"]
