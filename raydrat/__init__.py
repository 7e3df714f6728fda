"""raydrat: train decoder-only transformers with Ray Data, Ray Train, Ray Tune and MLflow."""

__version__ = "0.1.0"
"""The package version (``pyproject.toml`` reads it from here; ``raydrat --version`` prints it)."""
