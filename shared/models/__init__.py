"""SQLAlchemy models. Importing this package registers every table on ``Base.metadata``."""
from shared.models.audit import AuditLog
from shared.models.cases import Case, Crop, Diagnosis, Face, Image, ImageStatus, RegionScore, Result
from shared.models.catalog import Syndrome
from shared.models.ml import ImageFeature, ModelStatus, ModelVersion, TrainingRun
from shared.models.users import ApiToken, LoginSession, Role, User

__all__ = [
    "ApiToken", "AuditLog", "Case", "Crop", "Diagnosis", "Face", "Image", "ImageStatus", "ModelStatus",
    "ImageFeature", "LoginSession", "ModelVersion", "RegionScore", "Result", "Role", "Syndrome", "TrainingRun", "User",
]
