# CPU image for every step but training and evaluation (scan_labels, ingest, split, regions,
# sft, register). CPU-only PyTorch: the regions step uses the model family's image processor.
# Build from the repository root: `make images` (or docker build -f dockerfiles/data.Dockerfile .).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 1000 defectvlm
WORKDIR /app

COPY constraints.txt pyproject.toml README.md ./
RUN pip install "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0" \
 && pip install -c constraints.txt --index-url https://download.pytorch.org/whl/cpu torch torchvision
COPY src ./src
COPY configs ./configs
RUN pip install -c constraints.txt . && defectvlm --help > /dev/null
# The code's commit, for the lineage tags of runs made in this image (no .git inside).
ARG GIT_COMMIT=""
ENV DEFECTVLM_GIT_COMMIT=${GIT_COMMIT}

USER defectvlm
