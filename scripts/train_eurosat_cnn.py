"""Train the integer CNN label model (``--model eurosat-cnn``) on EuroSAT and measure it by k-fold cross-validation.

Usage (the 26,500 EuroSAT RGB tiles of ../shared/data/eurosat_rgb_26500.tar, extracted elsewhere;
never commit them, see ../shared/data/SOURCES.md for their attribution)::

    pip install torch==2.13.0            # training only; never a runtime dependency
    mkdir -p /tmp/eurosat26500 && tar xf ../shared/data/eurosat_rgb_26500.tar -C /tmp/eurosat26500
    python scripts/train_eurosat_cnn.py /tmp/eurosat26500/eurosat_rgb_26500 \\
        --out gpu_pipeline/labels/models/eurosat-cnn.json

Tiles are decoded by the package's decoder and resampled by the model's own integer rule
(:mod:`cpu_reference.cnn`), so the network trains on the bytes it will see. The float network
(3 x 3 convolutions without bias, batch normalization, ReLU, 2 x 2 max pool; global average pool;
a dense layer) is trained with PyTorch on the CPU, then quantized after training: batch
normalization folded into the convolutions, weights to int8 per output channel, activations to
uint8, each block's range topped at a percentile of its float outputs on every tenth training tile
(the percentile, of a few tried, whose integer network labels those tiles best), requantization as
an integer multiplier and shift.
Every accuracy printed is the **integer** network's, computed by the package's numba kernel.

With ``--folds K`` the script first trains K networks, each on K-1 folds, and labels the fold it
never saw (stratified, drawn by ``--seed``); then it trains on all tiles and writes that network.
Training is deterministic for a given PyTorch version and thread count (``--threads``, fixed at 2 by
default): the same command writes the same file byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cpu_reference import cnn as reference
from gpu_pipeline import __version__
from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.errors import bytes_shown
from gpu_pipeline.inputs.decode import decode_image
from gpu_pipeline.labels.cnn import CnnModel, model_json, resample
from gpu_pipeline.labels.confusion import accuracy, confusion_matrix, markdown_table
from gpu_pipeline.labels.labelled import read_labeled_tree
from gpu_pipeline.labels.splits import stratified_folds


def load_tiles(tree: Path, size: int, cache: Path | None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], str]:
    """Resampled (N, size, size, 3) uint8 tiles, their class indices, the classes and the data's digest."""
    labeled = read_labeled_tree(tree)
    if cache is not None and cache.exists():
        stored = np.load(cache)
        if int(stored["size"]) == size and len(stored["targets"]) == len(labeled.paths):
            return stored["inputs"], stored["targets"], labeled.classes, str(stored["digest"])
    options = DecodeOptions()
    with ThreadPoolExecutor() as pool:
        images = list(pool.map(lambda p: decode_image(p, options), labeled.paths))
    # The digest covers the class, relative path and decoded pixels of every tile, in order.
    digest = hashlib.sha256()
    for path, target, image in zip(labeled.paths, labeled.targets, images):
        digest.update(f"{labeled.classes[target]}/{path.relative_to(tree)}:{image.shape}\n".encode())
        digest.update(image.tobytes())
    inputs = resample(images, size)  # the package's kernel, held to cpu_reference.cnn by the tests
    if cache is not None:
        np.savez(cache, inputs=inputs, targets=labeled.targets, size=size, digest=digest.hexdigest())
    return inputs, labeled.targets, labeled.classes, digest.hexdigest()


def build_network(widths: tuple[int, ...], classes: int):
    import torch.nn as nn

    layers: list = []
    channels = 3
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                   nn.MaxPool2d(2)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


def dihedral(batch, choice: int):
    """One of the 8 flips and quarter turns of an (N, C, H, W) batch: land cover has no up or left."""
    import torch

    if choice & 4:
        batch = torch.flip(batch, dims=(3,))
    return torch.rot90(batch, choice & 3, dims=(2, 3))


def train(inputs: np.ndarray, targets: np.ndarray, classes: int, widths: tuple[int, ...], epochs: int,
          seed: int, batch: int = 128):
    """The float network trained on ``inputs`` (N, S, S, 3) uint8, pixels scaled to 0..1."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    network = build_network(widths, classes)
    data = torch.from_numpy(inputs).permute(0, 3, 1, 2).float().div(255.0)
    labels = torch.from_numpy(targets)
    steps = epochs * ((len(data) + batch - 1) // batch)
    optimizer = torch.optim.AdamW(network.parameters(), lr=4e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=4e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    network.train()
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        turns = torch.randint(0, 8, (len(order) // batch + 1,), generator=generator)
        for step, start in enumerate(range(0, len(data), batch)):
            chosen = order[start:start + batch]
            x = dihedral(data[chosen], int(turns[step]))
            loss = F.cross_entropy(network(x), labels[chosen], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    network.eval()
    return network


#: Percentiles of each block's float outputs tried as the top of its uint8 range (255).
PERCENTILES = (99.9, 99.97, 99.99, 99.999, 100.0)


def calibrated(network, inputs: np.ndarray, targets: np.ndarray, size: int,
               classes: tuple[str, ...]) -> tuple[reference.IntegerCnn, float, list[float]]:
    """The integer network whose activation ranges (:data:`PERCENTILES`) label ``inputs`` (training
    tiles) best, the first on a tie; that percentile; the activation scales."""
    best = None
    for percentile in PERCENTILES:
        integer, scales = quantize(network, inputs, size, percentile)
        right = int(np.sum(CnnModel(classes, integer).predict_inputs(inputs) == targets))
        if best is None or right > best[0]:
            best = (right, integer, percentile, scales)
    return best[1], best[2], best[3]


def quantize(network, calibration: np.ndarray, size: int, percentile: float
             ) -> tuple[reference.IntegerCnn, list[float]]:
    """The integer network of a trained float one (see the module docstring), and the activation
    scales (float value of one step of the input and of each block's output)."""
    import torch

    convs = [m for m in network if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in network if isinstance(m, torch.nn.BatchNorm2d)]
    dense = network[-1]
    # Activation scales: the ``percentile`` of each block's output on the calibration tiles.
    x = torch.from_numpy(calibration).permute(0, 3, 1, 2).float().div(255.0)
    scales = [1.0 / 255.0]  # the input: pixel values as they are
    with torch.no_grad():
        for layer in network:
            x = layer(x)
            if isinstance(layer, torch.nn.MaxPool2d):
                scales.append(float(np.percentile(x.numpy().ravel(), percentile)) / 255.0)
    blocks = []
    for index, (conv, norm) in enumerate(zip(convs, norms)):
        gain = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach().double().numpy()
        weights = conv.weight.detach().double().numpy() * gain[:, None, None, None]  # (out, in, 3, 3)
        bias = norm.bias.detach().double().numpy() - norm.running_mean.detach().double().numpy() * gain
        weight_scale = np.maximum(np.abs(weights).max(axis=(1, 2, 3)), 1e-12) / 127.0
        quantized = np.round(weights / weight_scale[:, None, None, None]).astype(np.int8)
        accumulator_scale = scales[index] * weight_scale
        ratio = accumulator_scale / scales[index + 1]
        shift = (30 - np.floor(np.log2(ratio))).astype(np.int64)  # multiplier in [2**30, 2**31)
        multiplier = np.round(ratio * 2.0 ** shift).astype(np.int64)
        blocks.append(reference.ConvBlock(np.ascontiguousarray(quantized.transpose(2, 3, 1, 0)),
                                          np.round(bias / accumulator_scale).astype(np.int32),
                                          multiplier, shift))
    # The dense layer sees sums over positions: mean = sum * scale / positions.
    positions = (size >> len(blocks)) ** 2
    weights = dense.weight.detach().double().numpy() * scales[-1] / positions
    scale = np.abs(weights).max() / 127.0
    integer = reference.IntegerCnn(size, tuple(blocks), np.round(weights / scale).astype(np.int8),
                                   np.round(dense.bias.detach().double().numpy() / scale).astype(np.int32))
    return integer, scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", type=Path, help="folder with one sub-folder of tiles per class")
    parser.add_argument("--out", type=Path, help="where to write the model (trained on every tile)")
    parser.add_argument("--fold-out", type=Path, help="also write the network of the last fold trained (for bench_labels.py)")
    parser.add_argument("--size", type=int, default=32, help="input size the tiles are resampled to")
    parser.add_argument("--widths", default="16,32,64", help="channels of each conv block")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (0: none)")
    parser.add_argument("--only-fold", type=int, help="train and score this one fold only (a quick estimate)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, help="keep the resampled tiles here (.npz) and reuse them")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    widths = tuple(int(w) for w in args.widths.split(","))
    inputs, targets, classes, digest = load_tiles(args.tree, args.size, args.cache)
    print(f"{len(inputs)} tiles, {len(classes)} classes, input {args.size}x{args.size}, widths {widths}")
    summary: dict = {}
    if args.folds:
        fold = stratified_folds(targets, args.folds, args.seed)
        predicted = np.full(len(targets), -1)
        for k in range(args.folds) if args.only_fold is None else [args.only_fold]:
            started = time.perf_counter()
            network = train(inputs[fold != k], targets[fold != k], len(classes), widths, args.epochs, args.seed)
            integer, percentile, _ = calibrated(network, inputs[fold != k][::10], targets[fold != k][::10],
                                                args.size, classes)
            model = CnnModel(classes, integer, {})
            predicted[fold == k] = model.predict_inputs(inputs[fold == k])
            with torch.no_grad():
                x = torch.from_numpy(inputs[fold == k]).permute(0, 3, 1, 2).float().div(255.0)
                floating = network(x).argmax(1).numpy()
            if args.fold_out is not None:
                fold_summary = {"fold": k, "of_folds": args.folds, "seed": args.seed, "epochs": args.epochs,
                                "held_out_accuracy": round(float(np.mean(targets[fold == k] == predicted[fold == k])), 4),
                                "calibration_percentile": percentile}
                args.fold_out.write_text(model_json(CnnModel(classes, integer, fold_summary)))
            print(f"fold {k}: integer {np.mean(targets[fold == k] == predicted[fold == k]):.4f}, "
                  f"float {np.mean(targets[fold == k] == floating):.4f}, calibration percentile {percentile} "
                  f"({time.perf_counter() - started:.0f} s)",
                  flush=True)
        scored = predicted >= 0
        matrix = confusion_matrix(targets[scored], predicted[scored], len(classes))
        recall = matrix.diagonal() / matrix.sum(axis=1)
        total = accuracy(matrix)
        print(f"cross-validated accuracy {total:.4f}, lowest recall {recall.min():.4f} ({classes[recall.argmin()]})")
        print(markdown_table(classes, matrix))
        summary["cross_validation"] = {"folds": args.folds, "seed": args.seed, "accuracy": round(total, 4),
                                       "recall": {c: round(float(r), 4) for c, r in zip(classes, recall)},
                                       "scored_folds": "all" if args.only_fold is None else [args.only_fold]}
    if args.out is not None:
        network = train(inputs, targets, len(classes), widths, args.epochs, args.seed)
        integer, percentile, scales = calibrated(network, inputs[::10], targets[::10], args.size, classes)
        summary.update({"data": bytes_shown(args.tree.name), "data_sha256": digest, "tiles": len(inputs),
                        "images_per_class": {c: int((targets == i).sum()) for i, c in enumerate(classes)},
                        "epochs": args.epochs, "seed": args.seed, "calibration_percentile": percentile,
                        "activation_scales": [float(f"{s:.6g}") for s in scales],
                        "torch": torch.__version__,
                        "threads": args.threads, "gpu_pipeline": __version__})
        args.out.write_text(model_json(CnnModel(classes, integer, summary)))
        print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
