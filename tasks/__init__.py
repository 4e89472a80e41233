"""Prefect tasks: thin, content-cached wrappers over ``mergeflow`` functions (orchestration issue: not built yet)."""
