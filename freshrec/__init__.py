"""freshrec: CLI, settings, metrics and the embedded local stack."""

__version__ = "0.1.0"
