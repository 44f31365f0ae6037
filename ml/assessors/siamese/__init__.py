from ml.assessors.siamese.assessor import SiameseAssessor, SiameseSettings

__all__ = ["SiameseAssessor", "SiameseSettings"]
