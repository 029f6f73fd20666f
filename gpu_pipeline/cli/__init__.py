"""The command line: the typer app (``app``), its options, and its three groups of commands.

``app.py`` holds ``run`` and the app itself, ``diagnostics.py`` verify / bench / info, ``labels.py``
fit / evaluate, ``options.py`` the options they share. The command line parses, checks and
delegates: the work happens in :mod:`gpu_pipeline.engine`.
"""

from gpu_pipeline.cli.app import app, main

__all__ = ["app", "main"]
