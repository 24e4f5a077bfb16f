"""skinrisk: skin-cancer risk triage from dermoscopic images and clinical metadata.

``tasks.stages`` holds the pipeline stages, one module each; the modules here are what they share
(the domain layer: ``schema``, ``params``, ``paths``, ``clinical``, ``images``, ``model``,
``scored_model``, ``metrics``, ``drift_profile``, ``tracking``, ...), the data import (``ingest``,
``download``, ``synth``), the services on a registered model (``serving``, ``triage``, ``app``) and the two
orchestrators' entry points (``cli`` for DVC, ``prefect_tasks`` for the flows in ``flows/``).
"""

__version__ = "0.1.0"
