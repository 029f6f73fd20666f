"""The Python API: the README's example runs, and the API gives the command line's bytes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

import gpu_pipeline
from gpu_pipeline.backends.reference import ReferenceBackend
from gpu_pipeline.config import PipelineConfig

REPO = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    section = (REPO / "README.md").read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    exec(compile(readme_example(), "README.md", "exec"), {})
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first.startswith("(100, 256)")
    assert second.startswith(str(REPO / "data" / "eurosat"))


def test_process_gives_the_reference_results_in_order():
    rng = np.random.default_rng(3)
    # more than one CPU batch (1 MP), mixed shapes and gray
    images = [rng.integers(0, 256, shape, dtype=np.uint8)
              for shape in [(300, 400, 3), (64, 64), (900, 700, 3), (50, 80, 3), (600, 600)]]
    got = gpu_pipeline.process(images, backend="numba", low=50, high=150, keep_images=True)
    want = ReferenceBackend().process(images, PipelineConfig(50, 150), keep_images=True)
    assert np.array_equal(got.histograms, want.histograms)
    assert np.array_equal(got.edge_counts, want.edge_counts)
    assert all(np.array_equal(a, b) for a, b in zip(got.edges, want.edges))
    assert len(got.labels) == len(images) and got.equalized is not None


def test_run_yields_the_records_the_command_line_writes(tmp_path):
    from typer.testing import CliRunner

    from gpu_pipeline.cli import app

    out = tmp_path / "out.jsonl"
    assert CliRunner().invoke(app, ["run", str(REPO / "data"), "--out", str(out), "-q"]).exit_code == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(gpu_pipeline.run([REPO / "data"])) == written


def test_closing_run_early_stops_the_engine():
    records = gpu_pipeline.run([REPO / "data"], backend="numba")
    assert "path" in next(records)
    records.close()  # returns once the engine has stopped
