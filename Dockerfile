# The luoshu inference server, CPU only: `luoshu serve` on the packages mounted at /models.
#
#   docker build -t luoshu:0.1.0 --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> .
#   docker run -p 8000:8000 -p 8001:8001 -v $PWD/packages:/models:ro luoshu:0.1.0 /models/dcn
#
# Without TORCH_INDEX_URL, pip takes torch==2.13.0 from PyPI, whose Linux wheel is the (much
# larger) CUDA build. The image runs as an unprivileged user and binds 0.0.0.0 inside the
# container; the Service in deploy/serve.yaml decides what reaches it.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/luoshu
COPY pyproject.toml README.md ./
COPY luoshu ./luoshu
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"; fi \
    && pip install . \
    && useradd --create-home --uid 1000 luoshu

USER luoshu
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"
ENTRYPOINT ["luoshu", "serve", "--host", "0.0.0.0", "--http-port", "8000", "--grpc-port", "8001"]
CMD ["/models/dcn"]
