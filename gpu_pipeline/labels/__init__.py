"""Labels: from a backend's integer outputs to a label, identical on every backend.

``labeller.py`` is the seam every label source joins (and the default rule); ``features.py`` the
integer features of land-cover models, ``model.py`` fitting, saving and loading them,
``labelled.py`` folder-per-class training data, ``splits.py``, ``confusion.py`` and ``plots.py``
their evaluation. Shipped models live in ``models/``.
"""
