"""The inference service: ONNX Runtime lip-sync models behind gRPC."""

__version__ = "0.1.0"
