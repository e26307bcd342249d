#!/usr/bin/env bash
# Prepare a GPU run (benchmarks/gpu/session.sh) on a machine whose image lacks this project's packages, e.g. the
# NVIDIA H200 device machine of the development workplace (Python 3.12, torch, transformers, peft, torchmetrics,
# timm, pandas, scipy, rich, pytest there; no diffusers, open-clip-torch). Run here, from anywhere in the checkout:
#
#     bash benchmarks/gpu/prepare.sh
#
# It downloads the missing pure-Python wheels for CPython 3.12 and packs them, unpacked, into .gpu/site.tar.xz
# (about 4 MB; xz of the unpacked files is far smaller than the wheels, and the working tree that travels to the
# device is capped at 64 MiB, of which the tracked files take about 56). .gpu/ is git-ignored via .git/info/exclude.
# Optional packages are left out (kornia: the rotation attack and jpeg_mode = "kornia"; invisible-watermark: the
# dwtdct defences): the GPU tests skip what they cannot import.
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
mkdir -p .git/info
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels diffusers==0.42.1 open-clip-torch==3.3.0 ftfy wcwidth importlib-metadata
for w in .gpu/wheels/*.whl; do python3 -m zipfile -e "$w" .gpu/site; done
tar -C .gpu/site -cJf .gpu/site.tar.xz .
rm -rf .gpu/wheels .gpu/site
ls -l .gpu/site.tar.xz
