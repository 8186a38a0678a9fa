"""splitlm: run a large language model split between an edge device and a cloud server."""

__version__ = "0.1.0"
