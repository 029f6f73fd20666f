"""The run: from a list of paths to records in a sink.

``job.py`` checks a job before anything is written and then executes it (resume, locks, signals,
progress); ``stream.py`` is the streaming batch engine (decode pool -> batches -> backend ->
labeller -> sink); ``distributed.py`` runs the same engine on Dask workers; ``cores.py`` says how
many cores the defaults may use.
"""
