"""``python -m gpu_pipeline.cli``: the same as the ``gpu-pipeline`` command."""

import sys

from gpu_pipeline.cli.app import main

sys.exit(main())
