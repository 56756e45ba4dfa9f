# CUDA image for the training and evaluation steps (and the trainer pods of a TrainJob).
# The CUDA toolkit matches the one PyTorch is built with (nvidia-cuda-runtime 13.0 in
# constraints.txt); DeepSpeed's fused Adam (GPU) and CPU Adam (offload configs) are compiled
# here, so no step compiles ops at start-up. Flash-attention is optional:
#   docker build -f dockerfiles/train.Dockerfile --build-arg FLASH_ATTENTION=1 .
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG FLASH_ATTENTION=0
ARG FLASH_ATTENTION_VERSION=2.8.3
# A100 (8.0), L40S/4090 (8.9), H100/H200 (9.0): the architectures the ops are compiled for
ARG TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0"
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev git \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv \
 && useradd --create-home --uid 1000 defectvlm
WORKDIR /app

COPY constraints.txt pyproject.toml README.md ./
RUN pip install "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0" \
 && pip install -c constraints.txt torch torchvision ninja
# Ops compiled against the torch above (no build isolation); versions pinned by constraints.txt.
RUN DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 pip install -c constraints.txt --no-build-isolation deepspeed \
 && ds_report
RUN if [ "$FLASH_ATTENTION" = 1 ]; then \
      pip install -c constraints.txt --no-build-isolation "flash-attn==${FLASH_ATTENTION_VERSION}"; \
    fi
COPY src ./src
COPY configs ./configs
COPY params.yaml ./
RUN pip install -c constraints.txt . && defectvlm --help > /dev/null
# The code's commit, for the lineage tags of runs made in this image (no .git inside).
ARG GIT_COMMIT=""
ENV DEFECTVLM_GIT_COMMIT=${GIT_COMMIT}

# Serving (`defectvlm deploy render` runs this image under KServe; pipeline steps set their own
# command): the inspection service on 8080, /healthz for Docker's health check.
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"
CMD ["defectvlm", "serve", "--host", "0.0.0.0", "--port", "8080"]
USER defectvlm
