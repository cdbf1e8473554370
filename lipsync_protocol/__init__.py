"""What both sides of the wire agree on: shapes, geometry, keys. Imported by the servers and the client alike,
so it depends on numpy at most (no server package, no ONNX Runtime, no OpenCV)."""
