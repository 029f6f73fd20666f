"""Outputs: a batch of results as records (``records.py``) and the files they go to (``sinks.py``)."""
