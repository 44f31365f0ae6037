from ml.assessors.rmcsam.assessor import RmcsamAssessor, RmcsamSettings

__all__ = ["RmcsamAssessor", "RmcsamSettings"]
