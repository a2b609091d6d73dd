"""The one error type of the service: an HTTP status, a machine-readable code and a message."""

from dataclasses import dataclass


@dataclass
class ServiceError(Exception):
    """Rendered as {"error": {"code": code, "message": message}} with the given status."""

    status: int
    code: str
    message: str
    retry_after: int | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def bad_image(message: str) -> ServiceError:
    return ServiceError(400, "bad_image", message)


def bad_request(message: str) -> ServiceError:
    return ServiceError(400, "bad_request", message)
