"""Segmentation data sets (COCO JSON, YOLO-seg, SA-1B, PNG-mask folders) for training and
evaluation; see :func:`load_dataset`."""

from .base import DataWarning
from .datasets import FORMATS, Sample, SegmentationDataset, detect_format, load_dataset

__all__ = [
    "FORMATS",
    "DataWarning",
    "Sample",
    "SegmentationDataset",
    "detect_format",
    "load_dataset",
]
