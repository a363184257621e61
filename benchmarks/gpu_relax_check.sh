#!/usr/bin/env bash
# GPU check of the batched relaxer with SevenNet-MF-0: batch budget, largest batch, ASE path vs batched on the
# same GPU, torch-sim when its wheels are carried. Not a test, not CI; <= 5 minutes on an H200.
#
# Prepare here (CPU), once:
#   PYTHONPATH=. .venv/bin/python benchmarks/gpu_relax_check.py --prepare .gpu     # structures + mf0.pt (~20 MB)
#   echo /.gpu/ >> .git/info/exclude   (.gpu/ is also in .gitignore)
#   wheels for the GPU machine's Python 3.12 (it has torch, e3nn, numpy, scipy; not ase, vesin, sevenn, torch-sim):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl ase vesin
#   optional, for the torch-sim comparison (check their Requires-Dist; ~64 MiB limit with .gpu):
#       sevenn torch-sim-atomistic and what they need beyond the machine's packages
# Run there (device tool): command `bash benchmarks/gpu_relax_check.sh`, carry [".gpu", ".whl"], timeout_s 420.
set -uo pipefail
OUT=${OUT:-reports/gpu-relax-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
timeout 300 python3 benchmarks/gpu_relax_check.py --data .gpu --out "$OUT" --n 128 --ase-n 16 --steps 100 "$@" \
    2>&1 | tee "$OUT/gpu_relax_check.log"
