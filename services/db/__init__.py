"""Storage: the ORM models of DESIGN §4, engines and sessions, and the Alembic migrations that build them."""

from services.db.engine import make_engine, session_factory
from services.db.models import (
    Assessment,
    Base,
    Coil,
    DriftReport,
    Feedback,
    Model,
    ModelPerformance,
    RetrainRun,
)

__all__ = [
    "Assessment",
    "Base",
    "Coil",
    "DriftReport",
    "Feedback",
    "Model",
    "ModelPerformance",
    "RetrainRun",
    "make_engine",
    "session_factory",
]
