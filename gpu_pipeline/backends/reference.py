"""The ``reference`` backend: the plain-NumPy specification behind the backend interface."""

from __future__ import annotations

from typing import Sequence

import numpy as np

import cpu_reference
from gpu_pipeline.backends.base import Backend, BatchResult, StageResult, check_image
from gpu_pipeline.config import PipelineConfig


class ReferenceBackend(Backend):
    name = "reference"

    def process(
        self, images: Sequence[np.ndarray], config: PipelineConfig, keep_images: bool = False
    ) -> BatchResult:
        results = []
        for image in images:
            check_image(image)
            stages = cpu_reference.process_image(image, config)
            results.append(StageResult(
                histogram=stages.histogram,
                edge_count=stages.edge_count,
                equalized=stages.equalized if keep_images else None,
                edges=stages.edges if keep_images else None,
            ))
        return BatchResult.from_results(results)
