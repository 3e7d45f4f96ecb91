"""Airflow integration: connection hooks, the provider registration, and the stage runner."""
