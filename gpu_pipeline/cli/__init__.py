"""The command line: the typer app (``app``), its options, and its three groups of commands.

``app.py`` holds ``run`` and the app itself, ``diagnostics.py`` verify / bench / info, ``labels.py``
fit / evaluate, ``options.py`` the options they share. The command line parses, checks and
delegates: the work happens in :mod:`gpu_pipeline.engine`.
"""

import gc
import os
import sys

from gpu_pipeline import unsupported_platform

if (_unsupported := unsupported_platform()) is not None:  # one line, before imports that would fail
    print(f"gpu-pipeline: error: {_unsupported}", file=sys.stderr)
    raise SystemExit(2)

# numpy and scipy (which numba imports) each start an OpenBLAS thread per core that spins for a
# while after loading; the command line makes no BLAS call worth a thread (0.2-0.4 s of CPU a run
# on 2 cores, and two pools of 15 threads on 16). The user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The imports below make a few hundred thousand objects and no garbage. Collected as they come,
# they cost 0.15 s of a one-image run's 0.7 s; frozen, no later collection looks at them again.
_collecting = gc.isenabled()
gc.disable()
from gpu_pipeline.cli.app import app, main  # noqa: E402

gc.freeze()
if _collecting:  # as the importer had it
    gc.enable()

__all__ = ["app", "main"]
