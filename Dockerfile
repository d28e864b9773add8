# Owl in a container: the chat page, the OpenAI-compatible API, /health and /metrics on port 7860.
#
#   docker build -t owl .
#   docker run --gpus all -p 7860:7860 -v ~/.cache/huggingface:/home/owl/.cache/huggingface \
#       owl --checkpoint MAGAer13/mplug-owl-llama-7b
#
# Arguments after the image name are app.py's flags. Without --checkpoint (and without a GPU) it serves
# the embedded tiny model from models/owl-tiny. Weights come from the HuggingFace hub into the cache
# volume at run time; `--build-arg BAKE_CHECKPOINT=<hub id>` puts them in the image instead, for
# machines without network (see the README's "Deploy" section).

# torch 2.13.0 from PyPI is built against CUDA 13.0 and brings its own CUDA libraries; the CUDA 13.0
# image sets up the NVIDIA container runtime and refuses host drivers too old for it (before 580).
FROM docker.io/nvidia/cuda:13.0.2-runtime-ubuntu24.04

# Ubuntu 24.04's Python is 3.12; a virtual environment keeps pip away from the system packages
# (PEP 668). Ubuntu's own `ubuntu` user holds uid 1000, which `owl` takes over so that a cache
# mounted from a typical host account is writable.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid 1000 --shell /bin/bash owl \
    && python3 -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/owl/.cache/huggingface \
    GRADIO_ANALYTICS_ENABLED=False \
    OWL_HOST=0.0.0.0 \
    OWL_LOG_DIR=/home/owl/logs

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# Optional weights baked into the image (before the code, so editing the code keeps this layer).
# They go to a folder outside the cache volume: a mounted cache would hide them, and a local folder
# loads without asking the hub anything.
ARG BAKE_CHECKPOINT=""
COPY owl/hub.py /opt/owl/hub.py
RUN mkdir -p /opt/owl/checkpoint /home/owl/.cache/huggingface /home/owl/logs \
    && if [ -n "$BAKE_CHECKPOINT" ]; then \
        HF_HOME=/tmp/hf python /opt/owl/hub.py "$BAKE_CHECKPOINT" /opt/owl/checkpoint \
        && rm -rf /tmp/hf; \
    fi \
    && chown -R owl:owl /opt/owl/checkpoint /home/owl
ENV OWL_CHECKPOINT=${BAKE_CHECKPOINT:+/opt/owl/checkpoint} \
    HF_HUB_OFFLINE=${BAKE_CHECKPOINT:+1}

COPY . .

# owl, by number: Kubernetes' runAsNonRoot can only verify a numeric user.
USER 1000:1000
VOLUME ["/home/owl/.cache/huggingface"]
EXPOSE 7860

# /health answers 200 once the model worker runs; loading a 14 GB checkpoint (and downloading it on a
# first start) takes minutes, hence the long start period. It follows OWL_PORT when that is set.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('OWL_PORT', '7860') + '/health', timeout=5)"]

ENTRYPOINT ["python", "app.py"]
