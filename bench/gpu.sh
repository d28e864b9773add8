#!/usr/bin/env bash
# Everything that needs a GPU, in one run (about 9 minutes on an H100): the GPU checks, the decode
# profile (transformers' layers against owl.fused's compiled ones, same model, same run), then the
# 7B serving benchmark against the naive baseline. Results go to $OUT (default /tmp/owl-gpu).
#   bash bench/gpu.sh
# Wheels in .whl/ (transformers, bitsandbytes, ...) are installed first when present, for machines
# that cannot reach a package index.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/owl-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 100 python3 bench/gpu_checks.py 2>&1 | tee "$OUT/checks.log"
timeout 180 python3 bench/profile_decode.py --preset mplug-owl-llama-7b 2>&1 | tee "$OUT/profile.log"
timeout 300 python3 bench/serve.py --preset mplug-owl-llama-7b --device cuda --concurrency 1 4 8 16 64 \
    --baseline-max 16 --new-tokens 64 --max-seq-len 1024 --json "$OUT/serve.json" 2>&1 | tee "$OUT/serve.log"
