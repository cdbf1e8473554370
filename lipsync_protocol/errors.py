"""Errors with the gRPC status code they travel as, and a message that names the field at fault.

Both sides use them: the services' plain classes (which tests and the in-process mode call directly, so they
cannot speak gRPC) raise them for their servicers to translate, and the protocol's own checks of a request's
fields (tensors, speech, timing) raise them whichever side runs the check.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base class: a request-level failure with a gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, retry_after_ms: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.reason = reason  # why a request was refused before any work, for metrics ("" when no such reason)


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED
