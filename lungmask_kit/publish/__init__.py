"""`lungkit publish`: a run folder -> a Hugging Face / Croissant / COCO-RLE dataset with a card and checksums."""

from lungmask_kit.publish.build import publish
from lungmask_kit.publish.schema import PublishOptions, PublishSummary

__all__ = ["PublishOptions", "PublishSummary", "publish"]
