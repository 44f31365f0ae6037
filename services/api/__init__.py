"""The REST API (``coilguard api``): status, models, coils, feedback, drift reports, metrics."""

from services.api.app import create_app

__all__ = ["create_app"]
