"""MimIC library: models, shift modules, data, prompts, metrics and the teacher cache format."""

__version__ = "0.1.0"
