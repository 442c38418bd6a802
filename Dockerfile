# Open-AutoGLM engine image.
#   CPU (default, slim):  docker build -t autoglm .
#   CUDA:                 docker build --build-arg VARIANT=cuda -t autoglm:cuda .
#                         docker run --gpus all ... autoglm:cuda
#   Edge (no torch):      docker build --build-arg VARIANT=edge -t autoglm:edge .
#                         docker run -v $PWD/models:/models:ro ... autoglm:edge
#                         (ONNX Runtime only: the models come from `autoglm export`
#                         on a full install; its routing file is deploy/edge/routing.toml)
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
COPY routing.toml /etc/autoglm/routing.toml
COPY deploy/edge/routing.toml /etc/autoglm/edge.toml
# CPU: torch from PyTorch's CPU wheel index (no CUDA libraries, ~4 GB smaller).
# RapidOCR without the opencv-python it declares (we have the headless build).
# Then compile librosa's numba kernels once, into the image.
# Edge: the `edge` extra's list (no torch, torchvision, transformers, librosa)
# and the engine itself without its core dependencies; its routing file
# replaces the default one.
RUN if [ "$VARIANT" = "edge" ]; then \
        python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['edge']))" > /tmp/edge.txt \
        && pip install -r /tmp/edge.txt \
        && pip install --no-deps . \
        && mv /etc/autoglm/edge.toml /etc/autoglm/routing.toml ; \
    elif [ "$VARIANT" = "cpu" ]; then \
        pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
        && pip install --no-deps rapidocr-onnxruntime==1.4.4 \
        && python -m processors.warmup ; \
    else \
        pip install . \
        && pip install --no-deps rapidocr-onnxruntime==1.4.4 \
        && python -m processors.warmup ; \
    fi
RUN useradd --create-home --uid 10001 autoglm
USER 10001
WORKDIR /home/autoglm

# Healthy = an engine answers its NATS health endpoint (embedded or external server).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["autoglm", "health", "--config", "/etc/autoglm/routing.toml"]

# With AUTOGLM_NATS_URL set the engine joins that server; unset, it starts the
# embedded nats-server inside the container.
CMD ["autoglm", "run", "--config", "/etc/autoglm/routing.toml"]
