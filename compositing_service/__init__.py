"""The compositing service: what clients call. Background caches, crops, paste-back, JPEG."""

__version__ = "0.1.0"
