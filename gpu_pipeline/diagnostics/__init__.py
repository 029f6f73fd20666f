"""Diagnostics: are all backends byte-identical here (``verify.py``), what this machine offers (``info.py``)."""
