"""Outputs: a batch of results as records, and the files they go to.

``records.py`` encodes a batch of results; ``sink.py`` is the format-neutral ``Sink`` interface;
``lines.py`` (JSON Lines, CSV) and ``parquet.py`` (a Parquet dataset) are the formats; ``plan.py``
chooses the format, reads back what an earlier run wrote (resume) and locks the output.
"""
