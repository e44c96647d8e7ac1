"""API errors as ``metav1.Status`` answers."""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "not_found", "already_exists", "invalid", "bad_request", "conflict"]


class ApiError(Exception):
    """An error answer: HTTP code, Status reason and message."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _details(plural: str, name: str, group: str = "") -> dict[str, Any]:
    details: dict[str, Any] = {"name": name, "kind": plural}
    if group:
        details["group"] = group
    return details


def _qualified(plural: str, group: str) -> str:
    return f"{plural}.{group}" if group else plural


def not_found(plural: str, name: str, group: str = "") -> ApiError:
    return ApiError(404, "NotFound", f'{_qualified(plural, group)} "{name}" not found', _details(plural, name, group))


def already_exists(plural: str, name: str, group: str = "") -> ApiError:
    return ApiError(409, "AlreadyExists", f'{_qualified(plural, group)} "{name}" already exists', _details(plural, name, group))


def conflict(plural: str, name: str, message: str, group: str = "") -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_qualified(plural, group)} "{name}": {message}',
        _details(plural, name, group),
    )


def invalid(kind: str, name: str, causes: list[str], group: str = "") -> ApiError:
    message = f'{kind}{"." + group if group else ""} "{name}" is invalid: ' + ", ".join(causes)
    details = {"name": name, "kind": kind, "causes": [{"message": c} for c in causes]}
    if group:
        details["group"] = group
    return ApiError(422, "Invalid", message, details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)
