"""The default label rule, pinned at the boundaries the README documents.

README ("Labels"): ``busy`` (edge density >= 22 %), ``textured`` (10 % to 22 %), and for tiles with
fewer edges ``dark-smooth`` (mean gray before equalization < 48), ``bright-smooth`` (>= 208) or
``smooth``. The numbers are written here, not imported, so a changed constant fails a test.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gpu_pipeline.labels.labeller import Features, default_label
from gpu_pipeline.cli import app

PIXELS = 10_000


def features(edge_count: int, gray_level: int = 128, pixels: int = PIXELS) -> Features:
    histogram = np.zeros(256, np.int64)
    histogram[gray_level] = pixels
    return Features(histogram, edge_count, pixels)


@pytest.mark.parametrize("edges, label", [
    (PIXELS, "busy"), (2200, "busy"),  # 22 % exactly is busy
    (2199, "textured"), (1000, "textured"),  # 10 % exactly is textured
    (999, "smooth"), (0, "smooth"),
])
def test_edge_density_bands(edges, label):
    assert default_label(features(edges)) == label


@pytest.mark.parametrize("level, label", [
    (0, "dark-smooth"), (47, "dark-smooth"), (48, "smooth"),
    (207, "smooth"), (208, "bright-smooth"), (255, "bright-smooth"),
])
def test_brightness_bands_of_smooth_tiles(level, label):
    assert default_label(features(999, level)) == label


def test_mean_gray_is_taken_over_the_whole_histogram():
    histogram = np.zeros(256, np.int64)
    histogram[[0, 95]] = PIXELS // 2  # mean 47.5: dark
    assert default_label(Features(histogram, 0, PIXELS)) == "dark-smooth"
    histogram[[0, 95]], histogram[[0, 96]] = 0, PIXELS // 2  # mean 48: not dark
    assert default_label(Features(histogram, 0, PIXELS)) == "smooth"


@pytest.mark.parametrize("level", [0, 128, 255])
def test_density_decides_before_brightness(level):
    """A dark or bright tile full of edges is busy or textured, never *-smooth."""
    assert default_label(features(2500, level)) == "busy"
    assert default_label(features(1500, level)) == "textured"


def test_end_to_end_labels_of_hand_made_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((32, 32), 20, np.uint8)).save(folder / "a_dark.png")
    Image.fromarray(np.full((32, 32), 230, np.uint8)).save(folder / "b_bright.png")
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(folder / "c_gray.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "d_noise.png")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["run", str(folder), "--out", str(out), "--backend", "reference", "-q"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    labels = [record["label"] for record in records]
    assert labels[:3] == ["dark-smooth", "bright-smooth", "smooth"]
    assert records[3]["edge_density"] >= 0.22 and labels[3] == "busy"


def test_the_readme_example_summary(tmp_path, bundled_data_dir):
    """README's `gpu-pipeline run` example prints these label counts for the bundled sample set."""
    readme = (bundled_data_dir.parent / "README.md").read_text()
    match = re.search(r"^labels: (.+)$", readme, re.MULTILINE)
    assert match, "the README's example output has no labels line"
    expected = {name: int(count) for count, name in
                ((part.rsplit(" ", 1)[1], part.rsplit(" ", 1)[0]) for part in match.group(1).split(", "))}
    if not any(bundled_data_dir.rglob("*.jpg")):
        pytest.skip("data/ holds no sample images")
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "r.jsonl"), "--backend", "reference"])
    assert result.exit_code == 0, result.output
    printed = re.search(r"^labels: (.+)$", result.stderr, re.MULTILINE).group(1)
    assert {part.rsplit(" ", 1)[0]: int(part.rsplit(" ", 1)[1]) for part in printed.split(", ")} == expected
