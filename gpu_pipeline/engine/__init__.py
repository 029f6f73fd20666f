"""The run: from a list of paths to records in a sink.

``job.py`` checks a job before anything is written and then executes it (resume, locks, signals,
progress); ``stream.py`` is the streaming batch engine (decode pool -> batches -> backend ->
labeller -> sink), and ``decoding.py`` its decode pool (files to decoded parts in input order, on
threads or in decode processes, bounded by pixels and by memory); ``distributed.py`` runs the same
engine on Dask workers; ``cores.py`` says how many cores the defaults may use.
"""
