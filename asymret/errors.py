"""Errors a user can cause. Each carries one sentence that says what to fix.

The CLI prints them without a traceback (exit status 2); the API returns them as JSON with a 4xx
status (``http_status``). Anything else that escapes is a bug in asymret.
"""

from __future__ import annotations


class AsymretError(Exception):
    """Base class of user-facing errors."""

    code = "invalid_input"
    http_status = 400


class ConfigError(AsymretError):
    """A config file or override is wrong: unknown key, wrong type, missing file."""

    code = "invalid_config"


class DataError(AsymretError):
    """A dataset, list or ground-truth file is missing, malformed or inconsistent."""

    code = "invalid_data"


class ImageError(DataError):
    """An image is missing or does not decode."""

    code = "invalid_image"
    http_status = 422


class InputError(AsymretError):
    """Arrays or arguments passed in do not fit together (shapes, NaN, lengths)."""

    code = "invalid_input"


class NotFoundError(AsymretError):
    """A named resource (gallery, item, run, checkpoint) does not exist."""

    code = "not_found"
    http_status = 404


class ConflictError(AsymretError):
    """A resource already exists, or the stored state disagrees with the request."""

    code = "conflict"
    http_status = 409


class UnauthorizedError(AsymretError):
    """The request carries no credentials where some are needed (no API key)."""

    code = "unauthorized"
    http_status = 401


class ForbiddenError(AsymretError):
    """The request is not allowed (path outside the allowed roots, a wrong API key)."""

    code = "forbidden"
    http_status = 403


class TrainingError(AsymretError):
    """Training cannot go on (the loss diverged, a resume does not fit the run)."""

    code = "training_failed"
    http_status = 409


class NotReadyError(AsymretError):
    """The pair and galleries are still loading (or failed to load: see /readyz)."""

    code = "not_ready"
    http_status = 503
