"""The pipeline's stages, one module each, named as in dvc.yaml, the CLI and the Prefect tasks.

``validate``, ``preprocess``, ``train``, ``evaluate``, ``explain``, ``reference`` (the drift
reference profile of the training data), ``register`` and ``promote`` are the stages of the same
names; ``monitor`` (``skinrisk monitor``, the monitoring flow) compares a new batch with that
reference. Each stage is a function of explicit inputs (paths, its params.yaml section, the MLflow
run id) that both orchestrators call: ``tasks.cli`` for DVC and ``tasks.prefect_tasks`` for the
Prefect flows.

Stages import the shared domain modules of ``tasks`` (``schema``, ``params``, ``clinical``,
``scored_model``, ``metrics``, ...), never one another.
"""
