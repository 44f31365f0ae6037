from ml.assessors.effnet.assessor import EffNetAssessor, EffNetSettings

__all__ = ["EffNetAssessor", "EffNetSettings"]
