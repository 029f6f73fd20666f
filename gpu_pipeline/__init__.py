"""gpu-pipeline: batch image analysis that gives the same bytes on every CPU and GPU path."""

__version__ = "0.1.0"
