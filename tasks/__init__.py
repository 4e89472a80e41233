"""Prefect tasks: thin wrappers over ``mergeflow`` library calls, cached by the content of their inputs."""
