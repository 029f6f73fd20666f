"""TO BE IMPLEMENTED (helper B): discovery, decoding, normalisation, clear per-file errors."""
