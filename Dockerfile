# GPU image: the CUDA build of torch comes from PyPI through the package's torch==2.13.0 pin.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface \
    COMFY_ENDPOINT_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY handler handler
COPY engine engine
COPY nodes nodes
COPY container container
RUN pip install . && useradd --create-home --uid 1000 comfy && mkdir -p /data /cache && chown comfy /data /cache

USER comfy
VOLUME ["/data", "/cache"]
EXPOSE 8188
HEALTHCHECK --interval=15s --timeout=3s CMD python -c "import urllib.request,os; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8188'))"
ENTRYPOINT ["python", "-m", "container.entrypoint"]
