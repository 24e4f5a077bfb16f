"""Prefect flows: compositions of the tasks in ``tasks.prefect_tasks``, no business logic."""
