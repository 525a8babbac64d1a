"""The engine: streaming, training, tuning, evaluation, tracking, statistics and the CLI."""

__version__ = "0.1.0"
