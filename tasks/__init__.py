"""skinrisk: skin-cancer risk triage from dermoscopic images and clinical metadata.

One module per pipeline stage (``ingest``, ``validate``, ``preprocess``, ``train``, ...) plus the
shared domain pieces (``schema``, ``params``, ``clinical``, ``model``) they build on.
"""

__version__ = "0.1.0"
