#!/usr/bin/env bash
# Download, here, the wheels that the GPU machine lacks (it has numba, numba-cuda, cupy, cv2, skimage,
# typer, rich, pytest and hypothesis, but no network): Pillow, tifffile and imagecodecs for
# CPython 3.12 on x86-64 Linux, into .whl/ (git-ignored). scripts/gpu_check.sh installs them from
# there when present; carry .whl to the GPU machine with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for package in pillow tifffile imagecodecs; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$package"
done
ls -l .whl
