from ml.assessors.yolo.assessor import YoloAssessor, YoloSettings

__all__ = ["YoloAssessor", "YoloSettings"]
