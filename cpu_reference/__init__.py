"""The executable specification of the pipeline contract, in plain NumPy.

One function per stage, each byte-equal to the OpenCV call that defines it (docs/contract.md).
Readable first: no numba, no tricks. Every backend is tested byte-equal to these functions.
"""

from cpu_reference.stages import (
    PipelineStages,
    canny,
    edge_count,
    equalize,
    gaussian_blur,
    gray,
    histogram,
    process_image,
    sobel,
)

__all__ = [
    "PipelineStages", "canny", "edge_count", "equalize", "gaussian_blur", "gray", "histogram",
    "process_image", "sobel",
]
