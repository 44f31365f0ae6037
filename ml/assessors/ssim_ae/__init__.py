from ml.assessors.ssim_ae.assessor import SsimAeAssessor, SsimAeSettings

__all__ = ["SsimAeAssessor", "SsimAeSettings"]
