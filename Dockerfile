# Open-AutoGLM engine image.
#   CPU (default, slim):  docker build -t autoglm .
#   CUDA:                 docker build --build-arg VARIANT=cuda -t autoglm:cuda .
#                         docker run --gpus all ... autoglm:cuda
# The CUDA variant takes PyPI's torch build, which bundles the CUDA runtime as
# wheels, so the same slim Python base serves both; only the host driver is needed.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY processors ./processors
# CPU: torch from PyTorch's CPU wheel index (no CUDA libraries, ~4 GB smaller).
# RapidOCR without the opencv-python it declares (we have the headless build).
# Then compile librosa's numba kernels once, into the image.
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install --extra-index-url https://download.pytorch.org/whl/cpu . ; \
    else \
        pip install . ; \
    fi \
    && pip install --no-deps rapidocr-onnxruntime==1.4.4 \
    && python -m processors.warmup

COPY routing.toml /etc/autoglm/routing.toml
RUN useradd --create-home --uid 10001 autoglm
USER 10001
WORKDIR /home/autoglm

# Healthy = an engine answers its NATS health endpoint (embedded or external server).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["autoglm", "health", "--config", "/etc/autoglm/routing.toml"]

# With AUTOGLM_NATS_URL set the engine joins that server; unset, it starts the
# embedded nats-server inside the container.
CMD ["autoglm", "run", "--config", "/etc/autoglm/routing.toml"]
