from ml.assessors.cnn.assessor import CnnAssessor, CnnSettings

__all__ = ["CnnAssessor", "CnnSettings"]
