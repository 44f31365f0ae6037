from ml.assessors.selfcon_margin.assessor import SelfConMarginAssessor, SelfConMarginSettings

__all__ = ["SelfConMarginAssessor", "SelfConMarginSettings"]
