"""Labelled surface images for the image assessors (real defect sets, image folders, rendered coils)."""

from ml.imagesets.base import ImageSet

__all__ = ["ImageSet"]
