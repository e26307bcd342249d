#!/usr/bin/env bash
# Prepare a GPU run (benchmarks/gpu/session.sh) on a machine whose image lacks this project's packages, e.g. the
# NVIDIA H200 device machine of the development workplace (Python 3.12, torch, transformers, peft, torchmetrics,
# timm, pandas, scipy, rich, pytest there; no diffusers, open-clip-torch, kornia). Run here, from the checkout:
#
#     bash benchmarks/gpu/prepare.sh
#
# It downloads the missing pure-Python wheels for CPython 3.12 and packs them, unpacked, into .gpu/site.tar.xz
# (about 5 MB: xz of the unpacked files is far smaller than the wheels, and the working tree that travels to the
# device is capped at 64 MiB, of which the tracked files take about 56). .gpu/ is git-ignored via info/exclude.
# kornia's compiled helper kornia_rs (5 MB) is replaced by an empty stand-in: kornia imports it at import time but
# only its image file I/O uses it, which nothing here calls. invisible-watermark (the dwtdct defences) is left out:
# the GPU tests skip those defences.
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qx "/.gpu/" "$exclude" 2>/dev/null || echo "/.gpu/" >> "$exclude"
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels diffusers==0.42.1 open-clip-torch==3.3.0 kornia==0.9.0 ftfy==6.3.1 wcwidth==0.9.4 \
    importlib-metadata==10.2.0
for w in .gpu/wheels/*.whl; do python3 -m zipfile -e "$w" .gpu/site; done
mkdir -p .gpu/site/kornia_rs
echo '"""Empty stand-in for kornia_rs on the GPU machine (benchmarks/gpu/prepare.sh): kornia.io is unused."""' \
    | tee .gpu/site/kornia_rs/__init__.py > .gpu/site/kornia_rs/io.py
tar -C .gpu/site -cJf .gpu/site.tar.xz .
rm -rf .gpu/wheels .gpu/site
ls -l .gpu/site.tar.xz
