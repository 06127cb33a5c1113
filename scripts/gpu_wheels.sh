#!/usr/bin/env bash
# Prepare, on a machine with PyPI access, the Python packages the GPU check needs and the GPU
# machine lacks (it has torch, but no bitsandbytes or hydra, and older transformers / peft):
# transformers as its wheel (61 MB unpacked, 14 MB zipped; scripts/gpu_check.sh pip-installs
# `.whl/*.whl` there), the rest unpacked into `.whl/site`, which gpu_check.sh puts on PYTHONPATH:
#
#   bash scripts/gpu_wheels.sh [CUDA_TAG]      # CUDA_TAG: the GPU's torch CUDA build, default cuda130
#
# bitsandbytes' wheel ships one library per CUDA / ROCm / XPU version (124 MB unpacked); only the
# one matching the GPU machine's torch (and the CPU one) is kept: .whl/ holds ~25 MB, and the
# device tool carries at most 64 MiB with the working tree. `.whl/` is git-ignored.
set -euo pipefail
CUDA_TAG="${1:-cuda130}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
rm -rf .whl && mkdir -p .whl/dl .whl/site
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d .whl/dl bitsandbytes==0.50.2 transformers==5.25.0 peft==0.21.2 hydra-core==1.3.2 omegaconf==2.3.0
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl/dl antlr4-python3-runtime==4.9.3  # sdist only
mv .whl/dl/transformers-*.whl .whl/
for w in .whl/dl/*.whl; do unzip -q -o "$w" -d .whl/site; done
tar xzf .whl/dl/antlr4-python3-runtime-4.9.3.tar.gz -C .whl/dl
cp -r .whl/dl/antlr4-python3-runtime-4.9.3/src/antlr4 .whl/site/
find .whl/site/bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*.so' \
    ! -name "libbitsandbytes_${CUDA_TAG}.so" ! -name 'libbitsandbytes_cpu.so' -delete
rm -rf .whl/dl
du -sh .whl/site .whl/*.whl
