"""The report on screen (a rich table, its legend, notes) and as a bar chart.

matplotlib is optional: imported only when a chart is drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpu_pipeline.bench.measuring import DECODE_IO, DECODE_OPENCV, BenchReport
from gpu_pipeline.bench.stats import Timing
from gpu_pipeline.errors import counted, one_line, printable
from gpu_pipeline.outputs.files import SOFTWARE

#: Short row names of the decoders in the table.
DECODE_LABELS = {DECODE_IO: "decode (io)", DECODE_OPENCV: "decode (cv2)"}


def _number(value: float) -> str:
    """Three significant digits or so, thousands separated (99.96 reads 100, not 100.0)."""
    if round(value, 1) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if round(value, 2) >= 10 else f"{value:.2f}"


def _images(count: int | None) -> str:
    return "any number of images" if not count else f"{count:,} image{'s' if count != 1 else ''}"


def _rate_cell(timing: Timing | None, per_image: bool = False) -> str:
    """Median megapixels/s and, after it, half the min-max range in % of the median (or images/s)."""
    if timing is None:
        return ""
    if per_image:
        return _number(timing.images_per_second["median"])
    rate = timing.megapixels_per_second
    if len(timing.seconds) == 1:
        return _number(rate["median"])
    half_range = (rate["max"] - rate["min"]) / 2 / rate["median"] * 100
    return f"{_number(rate['median'])} [dim]±{half_range:.0f}%[/]"


def _times(value: float | None) -> str:
    """A ratio with two significant digits: 0.054x, 0.7x, 7.6x, 33x, 120x."""
    if value is None:
        return "-"
    return f"{value:.2g}x" if value < 99.5 else f"{value:.0f}x"  # (from 99.5, two digits in g read "1e+02")


def describe_corpus(report: BenchReport) -> str:
    corpus, details = report.corpus, report.corpus.details
    shapes = ", ".join(f"{n} x {shape}" for shape, n in corpus.shapes().items())
    origin = (f"generated {details['format'].upper()}" if details.get("source") == "generated"
              else "given files")
    return f"{len(corpus.images)} images ({origin}: {shapes}), {corpus.pixels / 1e6:.1f} MP"


def results_table(report: BenchReport) -> Table:
    table = Table(title=describe_corpus(report), box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)
    for header in ("contender", "compute\nMP/s", "\nimg/s", "e2e\nMP/s", "\nimg/s",
                   "x baseline\ncomp / e2e", "e2e /\ndecode"):
        table.add_column(header, justify="left" if header == "contender" else "right", no_wrap=True)
    for c in report.contenders:
        name = c.name + ("*" if c.subset else "")
        if not c.measured:
            table.add_row(name, "[yellow]failed[/]" if c.status == "failed" else "[dim]n/a[/]", *[""] * 5)
            continue
        ratios = report.ratios(c)
        table.add_row(name, _rate_cell(c.compute), _rate_cell(c.compute, True), _rate_cell(c.end_to_end),
                      _rate_cell(c.end_to_end, True),
                      f"{_times(ratios['compute_vs_baseline'])} / {_times(ratios['end_to_end_vs_baseline'])}",
                      _times(ratios["end_to_end_vs_decode_only"]))
    table.add_section()
    for c in report.decoders:
        name = DECODE_LABELS.get(c.name, c.name) + ("*" if c.subset else "")
        if not c.measured:
            table.add_row(name, "", "", "[yellow]failed[/]" if c.status == "failed" else "[dim]n/a[/]", "", "", "")
        else:
            table.add_row(name, "", "", _rate_cell(c.decode), _rate_cell(c.decode, True), "", "")
    return table


def notes(report: BenchReport) -> list[str]:
    """What the table cannot say: subsets, why a contender did not run, GPU kernel time, dropped files."""
    lines = []
    for c in [*report.contenders, *report.decoders]:
        if c.subset:
            lines.append(f"{c.name}*: on {c.subset}")
        if not c.measured:
            lines.append(f"{c.name}: {c.status}: {c.reason}")
        if c.device and c.device.get("kernels_mp_per_s"):
            lines.append(f"{c.name}: kernels alone {c.device['kernels_mp_per_s']:,.0f} MP/s (GPU time)")
    for name, rows in report.scaling.items():  # (the table says "failed"; the JSON alone said why)
        lines.extend(f"{name} with {counted(row['threads'], 'thread')}: failed: {row['reason']}"
                     for row in rows if row["reason"])
    details = report.corpus.details
    if details.get("truncated"):
        lines.append(f"corpus: {details['truncated']}")
    if report.corpus.skipped:
        first = report.corpus.skipped[0]
        lines.append(f"corpus: {len(report.corpus.skipped)} files could not be decoded and are left out "
                     f"(first: {printable(first['path'])}: {printable(first['error'])})")
    return lines


def legend(report: BenchReport) -> list[str]:
    """How to read the table."""
    settings = report.settings
    spread_note = (f"median of {settings.repeats} repeats ± half their min-max range"
                   if settings.repeats > 1 else "one repeat")
    return [
        (f"{counted(settings.threads, 'thread')}, batches of up to {_images(settings.batch_size)} "
         f"and {_batch_pixels_note(settings.batch_pixels)}. MP/s: {spread_note}, "
         "after a warm-up; img/s at the median."),
        "comp: compute, on the decoded images in memory. e2e: end to end, the files through the engine "
        "(decode included).",
        ("x baseline: median MP/s over " + (f"{report.baseline}'s." if report.baseline else
                                            "the baseline's (none was measured).")
         + " e2e / decode: e2e MP/s over decode (io)'s."),
        ("warm-up, not in the rates: start (construction, JIT compile or cache load, pool start) + first pass "
         "(first launches, allocations), in s: "
         + (", ".join(f"{c.name} {c.startup_s:.2f} + {c.first_pass_s:.2f}" for c in report.contenders
                      if c.measured) or "none measured") + "."),
        (f"decode (io): the engine's decode pool alone (gpu_pipeline.inputs.decode); decode (cv2): cv2.imread in "
         f"{counted(settings.threads, 'thread')}."),
    ]


def scaling_table(report: BenchReport) -> Table | None:
    """Median MP/s of each scaled backend by thread count, compute and end to end, and the speed-up
    over one thread (the anchor, a process pool with every core, is in the main table)."""
    if not report.scaling:
        return None
    table = Table(title="scaling by threads (megapixels/s, median; x: over 1 thread)", box=box.SIMPLE_HEAD,
                  padding=(0, 1, 0, 0), show_edge=False)
    table.add_column("threads", justify="right")
    for name in report.scaling:
        table.add_column(f"{name} compute", justify="right")
        table.add_column(f"{name} end to end", justify="right")
    counts = [row["threads"] for row in next(iter(report.scaling.values()))]
    for index, threads in enumerate(counts):
        cells = [str(threads)]
        for rows in report.scaling.values():
            for mode in ("compute", "end_to_end"):
                timing, one = rows[index][mode], rows[0][mode]
                if timing is None:
                    cells.append("failed")
                    continue
                rate = timing["megapixels_per_s"]["median"]  # (one thread failed: no ratio, the rate all the same)
                cells.append(_number(rate) if one is None else
                             f"{_number(rate)} ({rate / one['megapixels_per_s']['median']:.1f}x)")
        table.add_row(*cells)
    return table


def print_report(console: Console, report: BenchReport) -> None:
    console.print(results_table(report))
    scaling = scaling_table(report)
    if scaling is not None:
        console.print(scaling)
    for line in legend(report):
        console.print(escape(line), soft_wrap=False)
    for line in notes(report):  # one line each, whatever the width: they name a contender, then say why
        console.print(escape(line), soft_wrap=True)


def plot_unavailable_reason() -> str | None:
    """None when matplotlib imports, else the message of ``--plot`` without it."""
    try:
        import matplotlib  # noqa: F401
    except Exception as exc:
        return f"--plot needs matplotlib ({one_line(exc)}); install it with: pip install 'gpu-pipeline[plot]'"
    return None


def plot_report(report: BenchReport, path: Path) -> None:
    """A bar chart of median MP/s per contender (compute, end to end; min-max as error bars),
    decode-only speed as a dashed line; log scale, since contenders differ by orders of magnitude."""
    from matplotlib.figure import Figure

    shown = [c for c in report.contenders if c.measured]
    figure = Figure(figsize=(max(6.0, 1.2 * len(shown) + 2), 4.5), layout="constrained")
    axes = figure.add_subplot()
    positions = np.arange(len(shown))
    width = 0.38
    for offset, mode, label in ((-width / 2, "compute", "compute (decoded, in memory)"),
                                (width / 2, "end_to_end", "end to end (decode included)")):
        rates = [getattr(c, mode).megapixels_per_second for c in shown]
        medians = np.array([r["median"] for r in rates])
        errors = np.array([[r["median"] - r["min"] for r in rates], [r["max"] - r["median"] for r in rates]])
        axes.bar(positions + offset, medians, width, yerr=errors, capsize=3, label=label)
    decode = report.find(DECODE_IO)
    if decode is not None and decode.decode is not None:
        axes.axhline(decode.decode.megapixels_per_second["median"], linestyle="--", color="gray",
                     label=f"decode only ({DECODE_IO})")
    axes.set_xticks(positions, [c.name + ("*" if c.subset else "") for c in shown])
    axes.set_yscale("log")
    axes.set_ylabel("megapixels per second (median; bars: min-max)")
    axes.set_title(f"{describe_corpus(report)}, {counted(report.settings.threads, 'thread')}", fontsize=9)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120, format="png", metadata={"Software": SOFTWARE})  # the mark of a file ours to replace


def _batch_pixels_note(batch_pixels: int | None) -> str:
    if batch_pixels is None:
        return "the pixels each backend asks for"
    return f"{batch_pixels / 2**20:g} MP"
