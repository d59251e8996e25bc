"""One exception hierarchy for the whole server.

Services and adapters raise these; the HTTP layer maps the class to a status code
through ``status_code`` and renders the body in the calling surface's shape.
Messages are written for the client: they never carry exception text from
libraries, file-system paths, memory addresses or tracebacks.
"""
from __future__ import annotations

from typing import Any


class ChatVLMError(Exception):
    """Base class. ``code`` is stable and machine-readable."""

    status_code: int = 500
    code: str = "INTERNAL_ERROR"

    def __init__(self, message: str, *, param: str | None = None,
                 details: Any = None, headers: dict[str, str] | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details
        self.headers = headers or {}
        if code:
            self.code = code


class ClientError(ChatVLMError):
    """The request was wrong; retrying it unchanged will fail again (4xx)."""

    status_code = 400
    code = "BAD_REQUEST"


class BadRequest(ClientError):
    status_code = 400
    code = "BAD_REQUEST"


class Unauthorized(ClientError):
    status_code = 401
    code = "UNAUTHORIZED"


class Forbidden(ClientError):
    status_code = 403
    code = "FORBIDDEN"


class NotFound(ClientError):
    status_code = 404
    code = "NOT_FOUND"


class ModelNotFound(NotFound):
    code = "MODEL_NOT_FOUND"


class AuthenticationFailed(Unauthorized):
    """Seed 004: no token, a bad or expired one, or a wrong user name or password (never which)."""

    code = "AUTHENTICATION_FAILED"


class AuthorizationFailed(Forbidden):
    code = "AUTHORIZATION_FAILED"


class Conflict(ClientError):
    status_code = 409
    code = "CONFLICT"


class ModelAlreadyExists(Conflict):
    code = "MODEL_ALREADY_EXISTS"


class PayloadTooLarge(ClientError):
    status_code = 413
    code = "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(ClientError):
    status_code = 415
    code = "UNSUPPORTED_MEDIA_TYPE"


class InvalidParameter(ClientError):
    status_code = 422
    code = "INVALID_PARAMETER"


class RateLimited(ClientError):
    status_code = 429
    code = "RATE_LIMITED"


class ServerError(ChatVLMError):
    """The server could not do the work (5xx)."""

    status_code = 500
    code = "INTERNAL_ERROR"


class ModelUnavailable(ServerError):
    """The model exists in the registry but cannot serve: not installed or failed to load."""

    status_code = 503
    code = "MODEL_NOT_AVAILABLE"


class ModelNotInstalled(ModelUnavailable):
    code = "MODEL_NOT_INSTALLED"


class ModelLoadFailed(ModelUnavailable):
    code = "MODEL_LOAD_FAILED"


class CapabilityMissing(ClientError):
    """The named model exists but cannot do what was asked (e.g. chat with an OCR engine).
    404: no model of that name serves this task (OpenAI answers a model that does not serve
    an endpoint with 404 too)."""

    status_code = 404
    code = "MODEL_CAPABILITY_MISSING"


class ModelNotRunning(ModelUnavailable):
    """The operator stopped the model through the management API: it does not load on demand."""

    code = "MODEL_NOT_RUNNING"


class InsufficientResources(ModelUnavailable):
    code = "INSUFFICIENT_RESOURCES"


class OperationTimeout(ServerError):
    status_code = 504
    code = "OPERATION_TIMEOUT"


class Overloaded(ServerError):
    status_code = 503
    code = "OVERLOADED"


class DeadlineExceeded(ServerError):
    status_code = 504
    code = "DEADLINE_EXCEEDED"


class Cancelled(ChatVLMError):
    """The client went away; nothing is sent back."""

    status_code = 499
    code = "CANCELLED"


# ---- remote engines (models of kind "remote": an OpenAI-protocol server behind us) ----------------
class BackendUnavailable(ServerError):
    """No URL of a remote engine is healthy right now (all down, or their circuits open)."""

    status_code = 503
    code = "BACKEND_UNAVAILABLE"


class BadGateway(ServerError):
    """The remote engine failed (5xx, a broken stream, an answer we cannot read)."""

    status_code = 502
    code = "BAD_GATEWAY"


class GatewayTimeout(ServerError):
    """The remote engine did not answer (or stream on) within the model's timeout_s."""

    status_code = 504
    code = "GATEWAY_TIMEOUT"


class RemoteRejected(ClientError):
    """The remote engine refused the request (4xx): the same status, with its message cleaned."""

    def __init__(self, status: int, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status_code = status
