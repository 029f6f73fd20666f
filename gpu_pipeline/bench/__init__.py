"""``gpu-pipeline bench``: megapixels per second of every backend, beside OpenCV and the
scikit-image pool, on the same images in the same run.

A corpus (generated, or the user's files) is measured three ways:

* compute: ``process()`` on the images already decoded in memory, in the engine's batches;
* end to end: the files through :class:`~gpu_pipeline.engine.stream.Engine` (its decode pool running
  gpu_pipeline.inputs.decode, batches, labels, records into a sink that drops them), as ``gpu-pipeline run``
  does;
* decode only: the engine's decode pool alone, and ``cv2.imread`` in as many threads.

Contenders: every registered backend (one that cannot run here is listed with the reason),
OpenCV's contract calls in a ``multiprocessing.Pool`` of one process per thread (what users
replace), the same calls in as many threads of one process (one image per thread), and the
scikit-image pipeline in such a pool (a similar pipeline, not byte-identical). Each contender is
warmed up first (JIT compile or cache load, first launches, pool start; reported apart), then
timed ``repeats`` times: the median, and min-max as the spread. Ratios are taken against the
baseline: the first measured of the OpenCV pool, the scikit-image pool and the reference.

cv2, skimage and matplotlib are optional: imported only when used, reported when missing.
"""

from gpu_pipeline.bench.baselines import (BASELINES, OPENCV, OPENCV_POOL, SKIMAGE_POOL, opencv_edge_count, pool_compute, pool_files,
                                          read_with_opencv, start_pool, usable_cores)
from gpu_pipeline.bench.corpus import (FORMATS, Corpus, cut_tiles, generate_corpus, load_corpus, spread_step,
                                       synthetic_scene, write_images)
from gpu_pipeline.bench.measuring import (DECODE_IO, DECODE_OPENCV, SCHEMA, SUBSET_MEGAPIXELS, BenchReport,
                                          BenchSettings, Contender, choose_baseline, decode_with_io,
                                          decode_with_opencv, measure_scaling, run_benchmark, run_compute,
                                          run_end_to_end, thread_counts, unavailable_reason)
from gpu_pipeline.bench.report import plot_report, plot_unavailable_reason, print_report
from gpu_pipeline.bench.request import default_batch_size, generation_request, parse_contenders, parse_size
from gpu_pipeline.bench.stats import Timing, median, ratio, spread, time_repeats

# The names the command line, the scripts and the tests use.
__all__ = [
    "BASELINES", "DECODE_IO", "DECODE_OPENCV", "FORMATS", "OPENCV", "OPENCV_POOL", "SCHEMA", "SKIMAGE_POOL", "SUBSET_MEGAPIXELS",
    "BenchReport", "BenchSettings", "Contender", "Corpus", "Timing", "choose_baseline", "cut_tiles",
    "decode_with_io", "decode_with_opencv", "default_batch_size", "generate_corpus", "generation_request",
    "load_corpus", "median", "opencv_edge_count", "parse_contenders", "parse_size", "plot_report",
    "plot_unavailable_reason", "pool_compute", "pool_files", "print_report", "ratio", "read_with_opencv",
    "measure_scaling", "run_benchmark", "run_compute", "run_end_to_end", "thread_counts", "spread", "spread_step", "start_pool", "synthetic_scene",
    "time_repeats", "unavailable_reason", "usable_cores", "write_images",
]
