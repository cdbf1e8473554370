"""Pieces both services use: config sources, error types, gRPC glue helpers."""
