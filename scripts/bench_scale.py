"""Nightly-scale benchmark: every target of issue #12 beside its anchor, measured in the same run.

    python scripts/bench_scale.py --json scale.json                 # everything (about 5 minutes on 2 cores)
    python scripts/bench_scale.py --only tiles scenes --repeat 3

Workloads (made under a temporary folder, never committed):

* tiles: the EuroSAT tiles of ../shared/data/eurosat_rgb_26500.tar (extracted), or ../shared/data/eurosat_rgb
  or data/eurosat, or the JPEGs of ``--tiles-from FOLDER`` (your own imagery), replicated by hard links
  to ``--tiles`` files;
* scenes: ``--scenes`` JPEGs of 4000x3000 (12 MP), mosaics of those tiles (quality 90);
* big: ``--big`` gray PNGs of 8000x8000 (64 MP), mostly zeros (the memory-bound case).

Measured (median and min-max of ``--repeat`` runs, anchors in the same run):

* ``gpu-pipeline run`` as a subprocess on each workload, with each ``--decode`` mode: wall time,
  minus the wall time of a one-image run (start-up) for the steady state; peak RSS of the process,
  and the peak of its memory and its decode processes' together (PSS summed over the tree);
* OpenCV in a ``multiprocessing.Pool`` of one process per core: cv2.imread + the contract's calls;
* scenes: the engine's decode pool alone and the backend's compute alone (same threads), and the
  overlap bound 1 / (1 / decode + 1 / compute);
* warm start (``gpu-pipeline run one.jpg``) and the first compile (an empty numba cache);
* engine overhead: the engine with decode served from memory and a backend that does nothing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
TILE_SOURCES = [SHARED / "eurosat_rgb", REPO / "data" / "eurosat"]
#: What each line is held to (issue #19 "Every core": 1.3x the pool on 2 cores; on the 16-core GPU
#: machine 1.5x for numba and 2x for cuda and cupy, scenes 1.3x the pool; 400 / 600 MB; a warm
#: one-image run in 1 s). set_targets() picks the tiles one for the backend and the machine; the
#: scenes' bound is this script's own (decode and compute one after the other).
TARGETS = {"tiles_vs_pool": 1.3, "scenes_vs_bound": 0.85, "scenes_vs_pool": 1.3, "tiles_rss_mib": 400,
           "scenes_rss_mib": 600, "big_rss_mib": 1200, "warm_start_s": 1.0, "first_compile_s": 12.0,
           "overhead_us": 10.0}


def set_targets(backend: str, cores: int) -> None:
    gpu = backend in ("cuda", "cupy")
    if cores > 2:
        TARGETS["tiles_vs_pool"] = 2.0 if gpu else 1.5


# ------------------------------------------------------------------------------------- corpora

def tile_files(scratch: Path, count: int, source: Path | None = None) -> list[Path]:
    """``count`` tiles: the JPEGs under ``source`` when given, else the EuroSAT tiles (the shared
    tarball extracted, or a folder of them); replicated by hard links (copies across file systems)
    when there are fewer."""
    tar = SHARED / "eurosat_rgb_26500.tar"
    if source is not None:
        tiles = sorted(source.rglob("*.jpg")) + sorted(source.rglob("*.jpeg"))
        if not tiles:
            sys.exit(f"no JPEG files under {source}")
    elif tar.exists():
        target = scratch / "eurosat"
        with tarfile.open(tar) as archive:
            archive.extractall(target, filter="data")
        tiles = sorted(target.rglob("*.jpg"))
    else:
        source = next((s for s in TILE_SOURCES if s.is_dir()), None)
        if source is None:
            sys.exit("no EuroSAT tiles found (../shared/data/eurosat_rgb_26500.tar, eurosat_rgb or data/eurosat); "
                     "give --tiles-from FOLDER")
        tiles = sorted(source.rglob("*.jpg"))
    if count <= len(tiles):
        return tiles[:count]
    return replicate(tiles, count, scratch / "replicated")


def replicate(tiles: list[Path], count: int, folder: Path) -> list[Path]:
    """``count`` files in ``folder`` (new), links to ``tiles`` over and over (the first ``count`` when
    there are more)."""
    folder.mkdir()
    files = []
    for index in range(count):
        destination = folder / f"{index // 1000:03d}" / f"{index:06d}.jpg"
        destination.parent.mkdir(exist_ok=True)
        link(tiles[index % len(tiles)], destination)
        files.append(destination)
    return files


def link(source: Path, destination: Path) -> None:
    """A hard link, or a copy where the two are on different file systems."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def scene_files(scratch: Path, tiles: list[Path], count: int) -> list[Path]:
    """``count`` 4000x3000 JPEG mosaics of 64x64 tiles (every scene a different set), made in a pool of
    processes (one after the other, 24 scenes took half a minute of a 2-minute step on the 16-core machine)."""
    folder = scratch / "scenes"
    folder.mkdir()
    across, down = -(-4000 // 64), -(-3000 // 64)
    rng = np.random.default_rng(12)
    jobs = [([str(tiles[k]) for k in rng.choice(len(tiles), across * down)], across,
             str(folder / f"scene_{index:02d}.jpg")) for index in range(count)]
    with multiprocessing.Pool(max(1, min(count, os.cpu_count() or 1))) as pool:
        pool.map(_mosaic, jobs)
    return [Path(path) for _, _, path in jobs]


def _mosaic(job: tuple[list[str], int, str]) -> None:
    """One scene: the tiles row by row, ``across`` a row, cut to 4000x3000, saved as a JPEG."""
    from PIL import Image

    chosen, across, path = job
    rows = [np.concatenate([np.asarray(Image.open(tile).convert("RGB")) for tile in chosen[start:start + across]],
                           axis=1) for start in range(0, len(chosen), across)]
    mosaic = np.ascontiguousarray(np.concatenate(rows, axis=0)[:3000, :4000])
    Image.fromarray(mosaic).save(path, quality=90)


def big_files(scratch: Path, count: int) -> list[Path]:
    """``count`` gray 8000x8000 PNGs, zeros but for a bright square (tiny files, 64 MP each)."""
    from PIL import Image

    folder = scratch / "big"
    folder.mkdir()
    image = np.zeros((8000, 8000), np.uint8)
    image[3000:5000, 3000:5000] = 200
    Image.fromarray(image).save(folder / "big_00.png")
    for index in range(1, count):
        os.link(folder / "big_00.png", folder / f"big_{index:02d}.png")
    return sorted(folder.glob("*.png"))


def file_list(scratch: Path, name: str, files: list[Path]) -> Path:
    """A folder of hard links to ``files`` (what `gpu-pipeline run FOLDER` takes; copies where
    ``--tiles-from`` is on another file system)."""
    folder = scratch / f"run_{name}"
    folder.mkdir()
    for index, path in enumerate(files):
        link(path, folder / f"{index:06d}{path.suffix}")
    return folder


# ------------------------------------------------------------------------------------- runners

#: Runs the command line and reports its peak RSS (VmHWM: the high-water mark of this process's own
#: memory since exec). wait4's ru_maxrss is no good here: Linux folds the RSS of the parent at fork
#: into it, so every run after the parent has grown would report the parent's size.
_WITH_PEAK_RSS = """
import atexit, runpy, sys
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("PEAK_RSS_KB " + line.split()[1] + "\\n")
atexit.register(report)
sys.argv = ["gpu-pipeline"] + sys.argv[1:]
runpy.run_module("gpu_pipeline.cli", run_name="__main__")
"""


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the decode processes of a run), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def _pss_kib(pid: int) -> int:
    """Proportional set size: pages shared between the run and its decode processes count once."""
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


#: Options added to every `gpu-pipeline run` (--run-args), e.g. a smaller GPU batch: --batch-size 4096.
RUN_ARGS: list[str] = []


def run_cli(target: Path, out: Path, backend: str, env: dict | None = None, decode: str = "auto",
            tree_memory: bool = False) -> dict:
    """`gpu-pipeline run` in a fresh process: wall seconds, its peak RSS and, with ``tree_memory``, the
    peak of the memory of it and its decode processes together (PSS summed over the process tree,
    sampled every 20 ms: reading smaps takes a good share of a core, so timed runs do not sample)."""
    command = [sys.executable, "-c", _WITH_PEAK_RSS, "run", str(target), "--out", str(out), "--backend", backend,
               "-q", "--overwrite", "--decode", decode, *RUN_ARGS]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, env=env, text=True)
    peak_tree, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak_tree[0] = max(peak_tree[0], sum(_pss_kib(pid) for pid in _tree(process.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    if tree_memory:
        sampler.start()
    _, stderr = process.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    if tree_memory:
        sampler.join()
    if process.returncode not in (0, 1):
        sys.exit(f"run failed: {stderr}")
    peak = [line.split()[1] for line in stderr.splitlines() if line.startswith("PEAK_RSS_KB ")]
    return {"seconds": seconds, "peak_rss_mib": int(peak[-1]) / 1024, "peak_tree_pss_mib": peak_tree[0] / 1024}


def _opencv_one(path: str) -> int:
    import cv2

    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    cv2.calcHist([gray], [0], None, [256], [0, 256])
    edges = cv2.Canny(cv2.GaussianBlur(cv2.equalizeHist(gray), (5, 5), 0), 100, 200)
    return cv2.countNonZero(edges)


def _opencv_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core, as users run it


def opencv_pool(files: list[Path], processes: int) -> float:
    """Seconds for OpenCV in a pool of ``processes`` (pool start included, as a user pays it)."""
    paths = [str(p) for p in files]
    start = time.perf_counter()
    with multiprocessing.Pool(processes, initializer=_opencv_init) as pool:
        for _ in pool.imap(_opencv_one, paths, chunksize=max(1, min(256, len(paths) // (4 * processes)))):
            pass
    return time.perf_counter() - start


def decode_only(files: list[Path], threads: int) -> float:
    from gpu_pipeline.config import DecodeOptions
    from gpu_pipeline.engine.decoding import decode_stream

    start = time.perf_counter()
    for _ in decode_stream(files, DecodeOptions(), threads):
        pass
    return time.perf_counter() - start


def compute_only(files: list[Path], backend) -> float:
    """The backend alone on the decoded images, in the engine's batches (decoded beforehand)."""
    from gpu_pipeline.config import DecodeOptions, PipelineConfig
    from gpu_pipeline.engine.decoding import DecodedPart, decode_stream
    from gpu_pipeline.engine.stream import part_batches
    from gpu_pipeline.images import ImageBatch

    decoded = list(decode_stream(files, DecodeOptions(), 2))
    whole = DecodedPart([item.path for item in decoded], ImageBatch.of([item.image for item in decoded]))
    start = time.perf_counter()
    for batch in part_batches(iter([whole]), None, backend.batch_pixels()):
        backend.process(batch.images, PipelineConfig())
    seconds = time.perf_counter() - start
    del decoded  # this process forks the next runs: keep it small
    return seconds


def decoded_from_memory(image_of):
    """A stand-in for the engine's ``decode_each`` that serves ``image_of(path)`` instead of decoding,
    for measuring the engine's own work. A place it is offered (a decode thread decodes a part's plain
    JPEGs into one buffer) is taken, as a decoder takes it, and handed back unwritten: the engine
    takes the path of a real run, and writing the pixels, a decoder's work, is not counted (copying
    them there cost 7-11 us a tile of CPU on the 2-core VM, three times the engine's own work)."""
    def decode_each(paths, options, into=None):
        for path in paths:
            image = image_of(path)
            place = into(image.shape) if into is not None else None
            yield image if place is None else place
    return decode_each


def engine_overhead(count: int) -> tuple[float, float]:
    """Microseconds per image of the engine itself, wall and CPU (all threads): decode served from
    memory, a backend that returns zeros, records encoded into a JSONL file."""
    from gpu_pipeline.engine import decoding, stream as engine_module
    from gpu_pipeline.backends.base import Backend, BatchResult
    from gpu_pipeline.outputs.plan import open_sink

    tile = np.zeros((64, 64, 3), np.uint8)

    class NothingBackend(Backend):
        name = "nothing"

        def process(self, images, config, keep_images=False):
            return BatchResult.empty(len(images), keep_images)

    real_decode = decoding.decode_each
    decoding.decode_each = decoded_from_memory(lambda path: tile)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            sink = open_sink(str(Path(scratch) / "out.jsonl"), resume=False)
            paths = [Path(f"/nightly/{i:06d}.jpg") for i in range(count)]
            engine = engine_module.Engine(NothingBackend(), workers=2, processes=False)  # decode threads, served from memory
            engine.run(paths[:2000], open_sink(str(Path(scratch) / "warm.jsonl"), resume=False))  # load the encoder
            start, cpu = time.perf_counter(), time.process_time()
            engine.run(paths, sink)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
            sink.close()
    finally:
        decoding.decode_each = real_decode
    return seconds / count * 1e6, cpu_seconds / count * 1e6


# ------------------------------------------------------------------------------------- report

def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "all": [round(v, 3) for v in values]}


def line(name: str, value: dict, unit: str, anchor: str = "", ratio: dict | None = None, target: str = "") -> None:
    text = f"{name:<34} {value['median']:>10,.1f} {unit:<6} ({value['min']:,.1f}-{value['max']:,.1f})"
    if anchor:
        text += f" | {anchor}"
    if ratio is not None:
        text += f" | ratio {ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"
    if target:
        text += f" | target {target}"
    print(text, flush=True)


def steady_seconds(run_s: float, start_s: float, workload: str) -> float:
    """The run's time less its start-up (the one-image run's time), said to be unreliable when the
    run is not at least twice as long as the start-up (too few files)."""
    if run_s < 2 * start_s:
        print(f"  (the {workload} run took {run_s:.2f} s, less than twice the {start_s:.2f} s of a one-image run: "
              f"too few files for a steady state; the rate below means little)", flush=True)
    return max(1e-3, run_s - start_s)


def bench_tiles(scratch: Path, files: list[Path], args, one: Path) -> dict:
    folder = file_list(scratch, "tiles", files)
    results = {}
    for decode in args.decode:
        ours, theirs, ratios, rss, tree, starts = [], [], [], [], [], []
        for repeat in range(args.repeat):
            start = run_cli(one, scratch / "one.jsonl", args.backend, decode=decode)["seconds"]
            run = run_cli(folder, scratch / "tiles.jsonl", args.backend, decode=decode)
            pool = opencv_pool(files, args.processes)
            steady = len(files) / steady_seconds(run["seconds"], start, "tiles")
            ours.append(steady), theirs.append(len(files) / pool), rss.append(run["peak_rss_mib"])
            starts.append(start)
            ratios.append(steady / (len(files) / pool))
        tree.append(run_cli(folder, scratch / "tiles.jsonl", args.backend, decode=decode, tree_memory=True)
                    ["peak_tree_pss_mib"])
        result = {"files": len(files), "steady_images_per_s": spread(ours),
                  "opencv_pool_images_per_s": spread(theirs), "ratio": spread(ratios), "peak_rss_mib": spread(rss),
                  "peak_tree_pss_mib": spread(tree), "one_image_run_s": spread(starts)}
        line(f"tiles ({len(files):,}), --decode {decode}, steady state", result["steady_images_per_s"], "img/s",
             f"OpenCV Pool({args.processes}) {result['opencv_pool_images_per_s']['median']:,.0f} img/s",
             result["ratio"], f">= {TARGETS['tiles_vs_pool']}x")
        line("tiles peak RSS of the run", result["peak_rss_mib"], "MiB", target=f"< {TARGETS['tiles_rss_mib']} MiB")
        line("tiles peak memory, run + decode processes (PSS)", result["peak_tree_pss_mib"], "MiB")
        results[decode] = result
    return results


def bench_scenes(scratch: Path, files: list[Path], args, one: Path, backend) -> dict:
    folder = file_list(scratch, "scenes", files)
    megapixels = len(files) * 12.0
    results = {}
    for decode in args.decode:
        ours, pool_rates, decode_rates, compute_rates, bounds, rss, tree = [], [], [], [], [], [], []
        for repeat in range(args.repeat):
            start = run_cli(one, scratch / "one.jsonl", args.backend, decode=decode)["seconds"]
            run = run_cli(folder, scratch / "scenes.jsonl", args.backend, decode=decode)
            ours.append(megapixels / steady_seconds(run["seconds"], start, "scenes")), rss.append(run["peak_rss_mib"])
            pool_rates.append(megapixels / opencv_pool(files, args.processes))
            decode_rates.append(megapixels / decode_only(files, args.processes))
            compute_rates.append(megapixels / compute_only(files, backend))
            bounds.append(1 / (1 / decode_rates[-1] + 1 / compute_rates[-1]))
        tree.append(run_cli(folder, scratch / "scenes.jsonl", args.backend, decode=decode, tree_memory=True)
                    ["peak_tree_pss_mib"])
        result = {"files": len(files), "steady_mp_per_s": spread(ours), "opencv_pool_mp_per_s": spread(pool_rates),
                  "decode_only_mp_per_s": spread(decode_rates), "compute_only_mp_per_s": spread(compute_rates),
                  "overlap_bound_mp_per_s": spread(bounds),
                  "vs_bound": spread([o / b for o, b in zip(ours, bounds)]),
                  "vs_pool": spread([o / p for o, p in zip(ours, pool_rates)]), "peak_rss_mib": spread(rss),
                  "peak_tree_pss_mib": spread(tree)}
        line(f"scenes ({len(files)} x 12 MP), --decode {decode}, steady state", result["steady_mp_per_s"], "MP/s",
             f"bound {result['overlap_bound_mp_per_s']['median']:.0f} MP/s (decode "
             f"{result['decode_only_mp_per_s']['median']:.0f}, compute {result['compute_only_mp_per_s']['median']:.0f})",
             result["vs_bound"], f">= {TARGETS['scenes_vs_bound']}x bound")
        line("scenes vs OpenCV pool", result["steady_mp_per_s"], "MP/s",
             f"OpenCV Pool({args.processes}) {result['opencv_pool_mp_per_s']['median']:.0f} MP/s", result["vs_pool"],
             f">= {TARGETS['scenes_vs_pool']}x")
        line("scenes peak RSS of the run", result["peak_rss_mib"], "MiB", target=f"<= {TARGETS['scenes_rss_mib']} MiB")
        line("scenes peak memory, run + decode processes (PSS)", result["peak_tree_pss_mib"], "MiB")
        results[decode] = result
    return results


def bench_big(scratch: Path, files: list[Path], args) -> dict:
    folder = file_list(scratch, "big", files)
    rss = [run_cli(folder, scratch / "big.jsonl", args.backend)["peak_rss_mib"] for _ in range(args.repeat)]
    result = {"files": len(files), "peak_rss_mib": spread(rss)}
    line(f"big ({len(files)} x 64 MP gray PNG) peak RSS", result["peak_rss_mib"], "MiB",
         target=f"<= {TARGETS['big_rss_mib']} MiB")
    return result


def bench_start(scratch: Path, args, one: Path) -> dict:
    warm = [run_cli(one, scratch / "one.jsonl", args.backend)["seconds"] for _ in range(args.repeat)]
    cold = []
    for repeat in range(args.compile_repeat):
        env = dict(os.environ, NUMBA_CACHE_DIR=str(scratch / f"empty-cache-{repeat}"))
        cold.append(run_cli(one, scratch / "one.jsonl", args.backend, env)["seconds"])
    result = {"warm_one_image_s": spread(warm), "first_compile_one_image_s": spread(cold) if cold else None}
    line("warm `run one.jpg`", result["warm_one_image_s"], "s", target=f"<= {TARGETS['warm_start_s']} s")
    if cold:
        line("first run (empty numba cache)", result["first_compile_one_image_s"], "s",
             target=f"<= {TARGETS['first_compile_s']} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=26_500)
    parser.add_argument("--tiles-from", type=Path, help="take the tiles from the JPEGs under this folder "
                        "(default: the EuroSAT tiles)")
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--big", type=int, default=32)
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile-repeat", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=["tiles", "scenes", "big", "start", "overhead"])
    parser.add_argument("--decode", nargs="+", choices=["auto", "threads", "processes"], default=["threads", "processes"],
                        help="--decode modes of the tiles and scenes runs (each measured)")
    parser.add_argument("--run-args", default="", help="options added to every `gpu-pipeline run`, "
                        "e.g. '--batch-size 4096' (GPU batches of 16 MP of tiles instead of 32)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    RUN_ARGS.extend(shlex.split(args.run_args))
    set_targets(args.backend, args.processes)
    wanted = set(args.only or ["tiles", "scenes", "big", "start", "overhead"])
    report: dict = {"backend": args.backend, "cores": os.cpu_count(), "repeat": args.repeat, "targets": TARGETS,
                    "load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-scale-") as scratch_name:
        scratch = Path(scratch_name)
        tiles = tile_files(scratch, args.tiles, args.tiles_from)
        one = tiles[0]
        if wanted & {"start", "tiles", "scenes"}:  # a stale or empty kernel cache compiles here, in no measured run
            run_cli(one, scratch / "one.jsonl", args.backend)
        if "overhead" in wanted:
            runs = [engine_overhead(20_000) for _ in range(args.repeat)]
            report["engine_overhead_us"] = spread([wall for wall, _ in runs])
            report["engine_overhead_cpu_us"] = spread([cpu for _, cpu in runs])
            line("engine overhead, nothing backend", report["engine_overhead_us"], "us/img",
                 target=f"<= {TARGETS['overhead_us']} us")
            line("  the same in CPU time (all threads)", report["engine_overhead_cpu_us"], "us/img")
        if "start" in wanted:
            report["start"] = bench_start(scratch, args, one)
        if "tiles" in wanted:
            report["tiles"] = bench_tiles(scratch, tiles, args, one)
        if "scenes" in wanted:
            from gpu_pipeline.backends import create

            scenes = scene_files(scratch, tiles, args.scenes)  # (its pool forks before the backend's threads start)
            backend = create(args.backend)
            backend.warm_up()
            report["scenes"] = bench_scenes(scratch, scenes, args, one, backend)
        if "big" in wanted:
            report["big"] = bench_big(scratch, big_files(scratch, args.big), args)
    report["load_average_at_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
