"""Generated from the .proto files beside this file by `make proto`; do not edit the *_pb2* modules."""
