"""Prefect deployments: schedules and event triggers (arrive with the drift-monitoring work)."""
