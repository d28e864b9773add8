"""What can go wrong with a request, each with its own kind, HTTP status and message.

The app shows ``str(error)`` as it is, the API returns it in OpenAI's error shape with
``http_status``, and the metrics count failures by ``kind``. Nothing is ever reported as a
generic "network error".
"""

from __future__ import annotations


class OwlError(Exception):
    """A request failed for a reason the user should see; ``str(error)`` says it plainly."""

    kind = "internal_error"
    http_status = 500


class BadRequest(OwlError, ValueError):
    """The request itself is wrong: fixing the input fixes it."""

    kind = "invalid_request"
    http_status = 400


class ImageError(BadRequest):
    kind = "invalid_image"


class ImageTooLarge(ImageError):
    kind = "image_too_large"
    http_status = 413


class PromptError(BadRequest):
    kind = "invalid_prompt"


class ContextLengthError(BadRequest):
    kind = "context_length_exceeded"


class ParameterError(BadRequest):
    kind = "invalid_parameter"


class LimitExceeded(BadRequest):
    """More images, text or tokens than this server allows."""

    kind = "limit_exceeded"
    http_status = 413


class QueueFullError(OwlError):
    kind = "queue_full"
    http_status = 429


class RateLimited(OwlError):
    kind = "rate_limited"
    http_status = 429


class OutOfMemory(OwlError):
    kind = "out_of_memory"
    http_status = 503


class WorkerUnavailable(OwlError):
    kind = "no_worker"
    http_status = 503


class RequestTimeout(OwlError):
    kind = "timeout"
    http_status = 504


class RequestFailed(OwlError):
    """An unexpected failure inside one request; the others go on."""

    kind = "internal_error"
    http_status = 500
