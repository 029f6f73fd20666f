"""The integer CNN label model: its NumPy reference, the numba kernels, the file, the commands.

Oracles: the reference (cpu_reference/cnn.py) is held to cases worked out by hand and to a naive
loop that computes each convolution output on its own; the numba kernels are held to the
reference byte for byte on random networks and images of every odd shape (hypothesis).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cpu_reference import cnn as reference
from gpu_pipeline.backends.reference import ReferenceBackend
from gpu_pipeline.backends.registry import create, unavailable_reason
from gpu_pipeline.cli import app
from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.engine.stream import Engine
from gpu_pipeline.inputs.decode import decode_image
from gpu_pipeline.inputs.discover import discover
from gpu_pipeline.labels.cnn import CnnModel, model_from_dict, model_json
from gpu_pipeline.labels.labelled import read_labeled_tree
from gpu_pipeline.labels.model import SHIPPED_MODELS, ModelError, load_model
from tests.cnn_networks import model_of, random_network
from tests.strategies import examples, images

runner = CliRunner()

#: What docs/labels.md promises for the shipped CNN (5-fold cross-validation on 26,500 tiles).
PROMISED_ACCURACY = 0.963
PROMISED_RECALL = 0.93


def one_block(weights: np.ndarray, bias: int = 0, multiplier: int = 2 ** 30, shift: int = 30) -> reference.ConvBlock:
    """A block with one output channel: ``weights`` (3, 3, 3)."""
    return reference.ConvBlock(weights.reshape(3, 3, 3, 1).astype(np.int8), np.array([bias], np.int32),
                               np.array([multiplier], np.int64), np.array([shift], np.int64))


def red_tap(value: int = 1) -> np.ndarray:
    """A kernel that takes the centre pixel's red value times ``value``."""
    weights = np.zeros((3, 3, 3), np.int64)
    weights[1, 1, 0] = value
    return weights


# --------------------------------------------------------------------------------------------
# The reference, worked out by hand


def test_resample_worked_out_by_hand():
    # 3 rows to 2: boxes [0, 1) and [1, 3); 5 columns to 2: [0, 2) and [2, 5).
    image = np.array([[0, 1, 2, 3, 4],
                      [10, 11, 12, 13, 14],
                      [20, 21, 22, 23, 25]], np.uint8)
    out = reference.resample(image, 2)
    # (0+1+1)//2 = 1; (2+3+4+1)//3 = 3; (10+11+20+21+2)//4 = 16; (12+13+14+22+23+25+3)//6 = 18
    assert out[:, :, 0].tolist() == [[1, 3], [16, 18]]
    assert np.array_equal(out[:, :, 0], out[:, :, 2])  # gray: three equal bands
    assert reference.resample(np.array([[7]], np.uint8), 4).tolist() == [[[7, 7, 7]] * 4] * 4  # 1 x 1: nearest
    tile = np.arange(64 * 64 * 3, dtype=np.int64).reshape(64, 64, 3) % 251
    halved = (tile[0::2, 0::2] + tile[0::2, 1::2] + tile[1::2, 0::2] + tile[1::2, 1::2] + 2) // 4
    assert np.array_equal(reference.resample(tile.astype(np.uint8), 32), halved)  # EuroSAT: 2 x 2 means


def test_identity_block_pool_and_dense_worked_out_by_hand():
    red = np.arange(1, 17).reshape(4, 4)  # max pools 6, 8, 14, 16: sum 44
    inputs = np.zeros((1, 4, 4, 3), np.uint8)
    inputs[0, :, :, 0] = red
    network = reference.IntegerCnn(4, (one_block(red_tap()),), np.array([[1], [-1]], np.int8),
                                   np.array([0, 100], np.int32))
    assert reference.scores(network, inputs).tolist() == [[44, 56]]
    network = reference.IntegerCnn(4, (one_block(red_tap()),), np.array([[1], [-1]], np.int8),
                                   np.array([20, 0], np.int32))
    assert reference.scores(network, inputs).tolist() == [[64, -44]]


def test_requantization_rounds_half_up_and_clips():
    inputs = np.zeros((1, 2, 2, 3), np.uint8)
    for value, expected in [(1, 1), (3, 2), (4, 2), (255, 128)]:  # (v + 1) // 2: a half rounds up
        inputs[0, 0, 0, 0] = value
        block = one_block(red_tap(), shift=31)
        assert reference.conv_block(inputs, block)[0, 0, 0, 0] == expected
    inputs[0, 0, 0, 0] = 200
    assert reference.conv_block(inputs, one_block(red_tap(2)))[0, 0, 0, 0] == 255  # 400 clips to 255
    assert reference.conv_block(inputs, one_block(red_tap(), bias=-201))[0, 0, 0, 0] == 0  # the ReLU


def test_zero_padding_and_the_dropped_odd_row():
    ones = np.zeros((3, 3, 3), np.int64)
    ones[:, :, 0] = 1
    inputs = np.zeros((1, 3, 3, 3), np.uint8)
    inputs[0, :, :, 0] = 10
    # Sums of the 3 x 3 neighbourhood inside the image: corners 40, edges 60, centre 90; the pool
    # sees the top-left 2 x 2 only (the third row and column are dropped).
    assert reference.conv_block(inputs, one_block(ones)).tolist() == [[[[90]]]]
    inputs[0, 2, :, 0] = 0
    inputs[0, :, 2, 0] = 0
    assert reference.conv_block(inputs, one_block(ones)).tolist() == [[[[40]]]]


def test_a_tie_goes_to_the_first_class():
    network = reference.IntegerCnn(2, (one_block(red_tap()),), np.array([[1], [1], [2]], np.int8),
                                   np.array([5, 5, 0], np.int32))
    assert reference.predict(network, [np.zeros((2, 2, 3), np.uint8)]).tolist() == [0]
    assert model_of(network).predict_images([np.zeros((2, 2, 3), np.uint8)]).tolist() == [0]


def naive_conv_block(activations: np.ndarray, block: reference.ConvBlock) -> np.ndarray:
    """Each output of a block computed on its own, by loops: an oracle for the vectorized reference."""
    n, height, width, inputs = activations.shape
    outputs = block.bias.shape[0]
    full = np.zeros((n, height, width, outputs), np.int64)
    for i in range(n):
        for y in range(height):
            for x in range(width):
                for o in range(outputs):
                    total = int(block.bias[o])
                    for dy in range(3):
                        for dx in range(3):
                            sy, sx = y + dy - 1, x + dx - 1
                            if 0 <= sy < height and 0 <= sx < width:
                                total += sum(int(activations[i, sy, sx, c]) * int(block.weights[dy, dx, c, o])
                                             for c in range(inputs))
                    level = (total * int(block.multiplier[o]) + 2 ** (int(block.shift[o]) - 1)) >> int(block.shift[o])
                    full[i, y, x, o] = min(max(level, 0), 255)
    pooled = np.zeros((n, height // 2, width // 2, outputs), np.uint8)
    for y in range(height // 2):
        for x in range(width // 2):
            pooled[:, y, x] = full[:, 2 * y:2 * y + 2, 2 * x:2 * x + 2].max(axis=(1, 2))
    return pooled


@settings(max_examples=examples(15), deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), height=st.integers(1, 7), width=st.integers(1, 7),
       channels=st.sampled_from([3, 5]), outputs=st.integers(1, 4))
def test_reference_block_matches_a_naive_loop(seed, height, width, channels, outputs):
    rng = np.random.default_rng(seed)
    activations = rng.integers(0, 256, (2, height, width, channels)).astype(np.uint8)
    block = reference.ConvBlock(rng.integers(-127, 128, (3, 3, channels, outputs)).astype(np.int8),
                                rng.integers(-60_000, 60_000, outputs).astype(np.int32),
                                rng.integers(2 ** 30, 2 ** 31, outputs).astype(np.int64),
                                rng.integers(33, 40, outputs).astype(np.int64))
    assert np.array_equal(reference.conv_block(activations, block), naive_conv_block(activations, block))


# --------------------------------------------------------------------------------------------
# numba against the reference


@st.composite
def networks(draw):
    blocks = draw(st.integers(1, 3))
    size = draw(st.sampled_from([s for s in (2, 4, 6, 8, 12, 16) if s >= 1 << blocks]))
    widths = tuple(draw(st.sampled_from([1, 3, 8, 17])) for _ in range(blocks))
    return random_network(np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1))), size, widths,
                          classes=draw(st.integers(2, 5)))


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(network=networks(), batch=st.lists(images(max_side=40), min_size=1, max_size=6))
def test_numba_is_byte_equal_to_the_reference(network, batch):
    model = model_of(network)
    inputs = np.stack([reference.resample(image, network.size) for image in batch])
    assert np.array_equal(model.resample(batch), inputs)
    sums = model.pooled_sums(inputs)
    assert np.array_equal(model.scores(sums), reference.scores(network, inputs))
    assert np.array_equal(model.predict_images(batch), reference.predict(network, batch))
    assert model.labels(batch, None, None) == [model.classes[k] for k in reference.predict(network, batch)]


def test_a_batch_is_only_a_convenience():
    rng = np.random.default_rng(3)
    model = model_of(random_network(rng, 16, (8, 16)))
    batch = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(20, 20, 3), (20, 20), (7, 30, 3), (20, 20, 3)]]
    assert model.labels(batch, None, None) == sum((model.labels([image], None, None) for image in batch), [])
    assert model.labels([], None, None) == []


def test_large_images_are_resampled_in_place_and_exactly():
    """Scenes (at least STACK_BELOW_PIXELS) go to the kernel one by one, as views, mixed with tiles."""
    rng = np.random.default_rng(5)
    batch = [rng.integers(0, 256, (600, 500, 3), dtype=np.uint8), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
             rng.integers(0, 256, (600, 500, 3), dtype=np.uint8), rng.integers(0, 256, (512, 512), dtype=np.uint8)]
    model = model_of(random_network(rng, 32, (8, 16)))
    assert np.array_equal(model.resample(batch), np.stack([reference.resample(image, 32) for image in batch]))


def test_real_tiles_numba_equals_reference(bundled_data_dir):
    model = load_model("eurosat-cnn")
    tiles = [decode_image(p, DecodeOptions()) for p in discover([bundled_data_dir / "eurosat"])]
    assert np.array_equal(model.predict_images(tiles), reference.predict(model.network, tiles))
    # The worst cases for the sums: a white tile and a black one.
    extremes = [np.full((64, 64, 3), 255, np.uint8), np.zeros((64, 64, 3), np.uint8)]
    assert np.array_equal(model.predict_images(extremes), reference.predict(model.network, extremes))


# --------------------------------------------------------------------------------------------
# The shipped model


def test_shipped_cnn_loads_by_name_and_keeps_the_documented_promise():
    model = load_model("eurosat-cnn")
    assert isinstance(model, CnnModel)
    assert model.to_dict() == load_model(SHIPPED_MODELS["eurosat-cnn"]).to_dict()
    assert model.classes == load_model("eurosat").classes
    validation = model.training["cross_validation"]
    assert validation["folds"] == 5 and validation["scored_folds"] == "all"
    assert sum(model.training["images_per_class"].values()) == 26_500
    assert validation["accuracy"] >= PROMISED_ACCURACY
    assert min(validation["recall"].values()) >= PROMISED_RECALL
    assert SHIPPED_MODELS["eurosat-cnn"].read_text() == model_json(model)  # the file is what the writer writes
    assert model.size == 32 and model.widths == (16, 32, 64, 128)  # as docs/labels.md describes it
    # labels.md's "4.0 million integer multiply-adds a tile": 3x3 convolutions on 32, 16, 8 and 4 pixels square
    # (halved after each block), then the dense layer
    assert model.multiply_adds == 32 ** 2 * 9 * 3 * 16 + 16 ** 2 * 9 * 16 * 32 + 8 ** 2 * 9 * 32 * 64 + \
        4 ** 2 * 9 * 64 * 128 + 128 * 10 == 3_982_592
    assert model.describe().endswith("conv blocks of 16, 32, 64, 128 channels, 4.0 M multiply-adds per image")
    assert SHIPPED_MODELS["eurosat-cnn"].stat().st_size < 450_000  # "425 kB"


def test_shipped_cnn_labels_the_bundled_tiles(bundled_data_dir):
    """The bundled tiles come from the training set: this checks the whole path, not generalisation."""
    labeled = read_labeled_tree(bundled_data_dir / "eurosat")
    model = load_model("eurosat-cnn")
    tiles = [decode_image(p, DecodeOptions()) for p in labeled.paths]
    assert np.mean(model.predict_images(tiles) == labeled.targets) >= 0.9


class ListSink:
    def __init__(self):
        self.records: list[dict] = []

    def write(self, records):
        self.records.extend(records)


def _engine_labels(backend, paths, model) -> list[str]:
    sink = ListSink()
    Engine(backend=backend, labels_of=model.labels, workers=2).run(paths, sink)
    return [record["label"] for record in sink.records]


def test_engine_labels_identical_on_reference_and_numba(bundled_data_dir):
    reason = unavailable_reason("numba")
    if reason is not None:
        pytest.skip(f"numba backend unavailable: {reason}")
    model = load_model("eurosat-cnn")
    paths = discover([bundled_data_dir])
    labels = _engine_labels(ReferenceBackend(), paths, model)
    with create("numba") as backend:
        assert _engine_labels(backend, paths, model) == labels
    decoded = [decode_image(p, DecodeOptions()) for p in paths]  # an independent path: no engine
    assert labels == [model.classes[k] for k in reference.predict(model.network, decoded)]


# --------------------------------------------------------------------------------------------
# The file


def _valid_dict() -> dict:
    network = random_network(np.random.default_rng(0), 8, (4, 6), classes=3)
    return model_of(network).to_dict()


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format_version=2), "format version 2 is not supported"),
    (lambda d: d.update(format_version=0), "format version 0 is not supported"),  # older ones too, not only newer
    (lambda d: d.pop("format_version"), "format version None is not supported"),
    (lambda d: d.update(classes=["a", "a", "b"]), "distinct"),
    (lambda d: d.update(classes=["a", "b", "For\udcffest"]), r'class "For\\xffest" is not UTF-8 text'),
    (lambda d: d.update(input_size=3), "input_size"),
    (lambda d: d.update(input_size=8.0), "input_size"),
    (lambda d: d.update(blocks=[]), "1 to 4 conv blocks"),
    (lambda d: d.update(blocks=[*d["blocks"], *d["blocks"], d["blocks"][0]]), "1 to 4 conv blocks"),  # 5: the kernel takes 4
    (lambda d: d["blocks"][0].update(weights=[[1]]), r"blocks\[0\].weights.*shape \(3, 3, 3, 4\)"),
    (lambda d: d["blocks"][1].update(weights=np.full((3, 3, 4, 6), 128).tolist()), r"blocks\[1\].weights.*-127..127"),
    (lambda d: d["blocks"][1].update(weights=np.full((3, 3, 4, 6), 1.5).tolist()), r"blocks\[1\].weights"),
    (lambda d: d["blocks"][0].update(shift=[0, 1, 1, 1]), r"shift.*1..62"),
    (lambda d: d["blocks"][0].update(shift=[63, 1, 1, 1]), r"shift.*1..62"),
    (lambda d: d["blocks"][0].update(multiplier=[0, 1, 1, 1]), r"multiplier.*1..2147483648"),
    (lambda d: d["blocks"][0].update(multiplier=[2 ** 31 + 1, 1, 1, 1]), r"multiplier.*1..2147483648"),
    (lambda d: d.update(input_size=257), "input_size.*to 256"),
    (lambda d: d["blocks"][1].update(shape=[3, 3, 4, 7]), r"blocks\[1\].shape.*\[3, 3, 4, 6\]"),
    (lambda d: d["dense"].pop("shape"), r"dense.shape"),
    (lambda d: d["blocks"][0].update(multiplier=[True] * 4), "multiplier"),
    (lambda d: d["blocks"][0].update(bias=[2 ** 31 - 1] * 4), "too large"),
    (lambda d: d["dense"].update(weights=[[1] * 6] * 2), "dense.weights"),
    (lambda d: d.pop("dense"), "dense"),
    (lambda d: d.update(training=[]), "training"),
])
def test_malformed_cnn_model_names_the_problem(tmp_path, change, message):
    data = _valid_dict()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=message) as caught:
        load_model(path)
    assert str(path) in str(caught.value)


def test_the_largest_input_and_multipliers_of_labels_md_load(tmp_path):
    """labels.md: input up to 256, multipliers 1..2^31, shifts 1..62."""
    data = _valid_dict()
    data["input_size"] = 256
    data["blocks"][0].update(multiplier=[2 ** 31, 1, 2 ** 31, 1], shift=[62, 1, 1, 62])
    path = tmp_path / "edge.json"
    path.write_text(json.dumps(data))
    loaded = load_model(path)
    assert loaded.size == 256 and loaded.network.blocks[0].multiplier.tolist() == [2 ** 31, 1, 2 ** 31, 1]


def test_the_smallest_input_halved_once_per_block_loads_and_labels(tmp_path):
    """The input is halved once per block: two blocks take 4 x 4 (4 -> 2 -> 1), the least the error
    message names ("from 4 to 256"); 3 is refused (above)."""
    data = _valid_dict()
    data["input_size"] = 4
    path = tmp_path / "small.json"
    path.write_text(json.dumps(data))
    loaded = load_model(path)
    assert loaded.size == 4 and len(loaded.labels([np.zeros((8, 8, 3), np.uint8)], None, None)) == 1


def test_model_file_round_trip(tmp_path):
    model = model_from_dict(_valid_dict())
    path = tmp_path / "m.json"
    path.write_text(model_json(model))
    loaded = load_model(path)
    assert loaded.to_dict() == model.to_dict()
    probe = [np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8)]
    assert np.array_equal(loaded.predict_images(probe), reference.predict(model.network, probe))


def test_a_pickle_is_never_loaded(tmp_path):
    import pickle

    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(_valid_dict()))
    with pytest.raises(ModelError, match="is not a model file|not valid JSON"):
        load_model(path)


def test_malformed_cnn_exits_2_with_one_line_and_writes_nothing(tmp_path, bundled_data_dir):
    data = _valid_dict()
    data["blocks"][0]["shift"] = [99] * 4
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "r.jsonl"
    tile = next(iter(discover([bundled_data_dir / "eurosat"])))
    for command in (["run", str(tile), "--out", str(out)], ["evaluate", str(bundled_data_dir / "eurosat")],
                    ["verify", str(tile), "--backends", "numba"]):
        result = runner.invoke(app, [*command, "--model", str(path)])
        assert result.exit_code == 2, result.output
        assert "shift" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# The commands


def test_run_with_the_cnn_labels_land_cover(tmp_path, bundled_data_dir):
    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["run", str(bundled_data_dir / "eurosat"), "--out", str(out), "--model",
                                 "eurosat-cnn", "--quiet"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    classes = load_model("eurosat-cnn").classes
    right = [r["label"] == Path(r["path"]).parent.name for r in records]
    assert all(r["label"] in classes for r in records) and np.mean(right) >= 0.9


def test_the_cnn_takes_any_pipeline_settings(tmp_path, bundled_data_dir):
    """labels.md: the CNN does not depend on --low/--high/--l2/--blur (it sees the pixels): run and
    verify with other settings are not refused, and the labels are the reference network's."""
    folder = bundled_data_dir / "eurosat" / "Highway"
    other = ["--low", "30", "--high", "60", "--l2", "--blur", "3"]
    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["run", str(folder), "--out", str(out), "--model", "eurosat-cnn", "--quiet", *other])
    assert result.exit_code == 0, result.output
    records = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["path"])
    model = load_model("eurosat-cnn")
    tiles = [decode_image(Path(r["path"]), DecodeOptions()) for r in records]
    expected = reference.predict(model.network, tiles)
    assert [r["label"] for r in records] == [model.classes[k] for k in expected]
    result = runner.invoke(app, ["verify", str(folder), "--backends", "numba", "--model", "eurosat-cnn", *other])
    assert result.exit_code == 0 and "IDENTICAL" in result.output, result.output


def test_verify_with_the_cnn_says_identical(tmp_path, bundled_data_dir):
    result = runner.invoke(app, ["verify", str(bundled_data_dir / "eurosat"), "--backends", "numba",
                                 "--model", "eurosat-cnn"])
    assert result.exit_code == 0, result.output
    assert "identical" in result.output


def test_evaluate_the_cnn(bundled_data_dir):
    result = runner.invoke(app, ["evaluate", str(bundled_data_dir / "eurosat"), "--model", "eurosat-cnn"])
    assert result.exit_code == 0, result.output
    assert "integer CNN" in result.output and "accuracy" in result.output


def test_evaluate_the_cnn_leaves_out_a_broken_image(tmp_path, bundled_data_dir):
    """labels.md: the broken images listed, the rest evaluated. The row kept for a failed image is as wide
    as the CNN's features (its last block's channels), not its classes: one table, no traceback."""
    tree = tmp_path / "tree"
    for name in ("Forest", "SeaLake"):
        (tree / name).mkdir(parents=True)
        for tile in sorted((bundled_data_dir / "eurosat" / name).iterdir())[:2]:
            (tree / name / tile.name).write_bytes(tile.read_bytes())
    (tree / "Forest" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model = load_model("eurosat-cnn")
    assert model.feature_count == model.widths[-1] != len(model.classes)
    result = runner.invoke(app, ["evaluate", str(tree), "--model", "eurosat-cnn", "--backend", "reference"])
    assert result.exit_code == 1, result.output
    assert "1 image(s) could not be processed" in result.stderr and "broken.png: decode:" in result.stderr
    assert "/4 images)" in result.stdout and "Traceback" not in result.output


def test_training_twice_writes_the_same_file(tmp_path):
    """scripts/train_eurosat_cnn.py, as docs/labels.md promises: the same command, the same bytes
    (a tiny tree and network; PyTorch is a training-only dependency, so this skips without it)."""
    pytest.importorskip("torch", reason="training needs PyTorch (pip install torch==2.13.0); not a runtime dependency")
    import subprocess
    import sys

    from PIL import Image

    rng = np.random.default_rng(0)
    for name, colour in (("dark", 40), ("bright", 200)):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for k in range(12):
            tile = np.clip(rng.normal(colour, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(tile).save(tmp_path / "tree" / name / f"{k}.png")
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_eurosat_cnn.py"
    for out in ("a.json", "b.json"):
        subprocess.run([sys.executable, str(script), str(tmp_path / "tree"), "--size", "8", "--widths", "4",
                        "--epochs", "2", "--folds", "0", "--out", str(tmp_path / out)],
                       check=True, capture_output=True, timeout=300)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    model = load_model(tmp_path / "a.json")
    assert model.classes == ("bright", "dark") and model.training["tiles"] == 24
    assert len(model.training["data_sha256"]) == 64


@pytest.mark.parametrize("block, channels", [(0, 3), (1, 4)])
def test_the_largest_bias_whose_sums_stay_in_int32_loads_and_one_more_is_refused(tmp_path, block, channels):
    """labels.md: no sum can leave int32. A block of ``channels`` inputs adds at most 9 taps x
    channels x 255 x 127 to its bias (874,395 for RGB): the bias may be 2**31 - 1 less that, not
    more. (A bound that forgot the channels let an RGB block's int32 sums wrap on a white tile.)"""
    worst = 9 * channels * 255 * 127
    path = tmp_path / "m.json"
    data = _valid_dict()
    data["blocks"][block]["bias"] = [2 ** 31 - 1 - worst, 0, -(2 ** 31 - 1 - worst)] + [0] * (len(
        data["blocks"][block]["bias"]) - 3)
    path.write_text(json.dumps(data))
    assert load_model(path).network.blocks[block].bias[0] == 2 ** 31 - 1 - worst
    data["blocks"][block]["bias"][0] += 1
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=rf"blocks\[{block}\].bias.*too large"):
        load_model(path)
