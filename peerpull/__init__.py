"""peerpull application layer: CLI, configuration, logging and daemon composition root."""

__version__ = "0.1.0"
