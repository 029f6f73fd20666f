#!/usr/bin/env bash
# Download, here, the wheels that the GPU machine lacks (it has numba, numba-cuda, cupy, cv2, skimage,
# typer, rich, pytest and hypothesis, but no network): Pillow, tifffile and imagecodecs, a numpy < 2.5
# (its numpy 2.5 breaks numba-cuda 0.30.4) and gilknocker (../shared/tools/gil_per_tile.py), for
# CPython 3.12 on x86-64 Linux, into .whl/ (git-ignored, about 52 MB of the 64 MiB a run may carry).
# scripts/device_env.sh installs them from there; carry .whl to the GPU machine with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for package in pillow tifffile imagecodecs "numpy>=2.4,<2.5" gilknocker; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$package"
done
ls -l .whl
