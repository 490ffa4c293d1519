#!/usr/bin/env bash
# The GPU acceptance check in one command, on a single-GPU machine with no network (../shared/GPU.md):
#
#   bash benchmarks/gpu_check.sh [OUT]      # default OUT: $OUT, else ./gpu-check
#
# 1. a venv over the machine's own Python packages (its torch, triton and CUDA stay in use), into which
#    the wheels carried in .whl/ and then this checkout (editable, as CI installs it) are installed
#    without any index;
# 2. python benchmarks/gpu_check.py: (a) the Triton kernels against their references and timed,
#    (b) stages 1-3 through the deepspeed launcher with a SIGKILL + resume, (c) bench_training.py;
#    one table, also written to OUT/gpu_check.md; the whole log goes to OUT/gpu_check.log.
#
# .whl/ (git-ignored) must hold, for the machine's Python, every package of the import closure of
# para_train that the machine lacks, at the versions of constraints.txt: typically deepspeed (built with
# DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==VERSION: pure Python, its ops never needed here),
# diffusers, mosaicml-streaming and what it imports (zstd, python-snappy, brotli, catalogue, xxhash,
# torchvision matching the machine's torch), transformers, huggingface_hub and tokenizers (the project
# holds transformers < 5), pydantic, pydantic_core, annotated-types, typing-inspection, hjson, py-cpuinfo,
# msgpack, einops, pillow, requests and its dependencies, setuptools (for the editable install).
# Tracking stays off, so MLflow is not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
log=$out/gpu_check.log
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$(mktemp -d)/triton}

run() {
    local start=$SECONDS venv
    venv=$(mktemp -d)/venv
    python3 -m venv --system-site-packages "$venv"
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
    if compgen -G ".whl/*.whl" >/dev/null; then
        python -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
    else
        echo "gpu_check.sh: no wheels in .whl/: using what the machine has"
    fi
    python -m pip install -q --no-index --no-deps --no-build-isolation --no-compile -e .
    echo "gpu_check.sh: installed in $((SECONDS - start)) s"
    nvidia-smi || true
    python -m pip list 2>/dev/null
    python benchmarks/gpu_check.py --out "$out"
}

run 2>&1 | tee "$log"
