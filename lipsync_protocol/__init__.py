"""What both sides of the wire agree on: shapes, geometry, keys, the hop's fast encoding. Imported by the servers
and the client alike, so it depends on numpy and the generated protobuf code only (no server package, no ONNX
Runtime, no OpenCV)."""
