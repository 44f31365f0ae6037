from ml.assessors.contrastive_seg.assessor import ContrastiveSegAssessor, ContrastiveSegSettings

__all__ = ["ContrastiveSegAssessor", "ContrastiveSegSettings"]
