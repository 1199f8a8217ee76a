"""lungkit: batch lung segmentation for chest X-ray datasets."""

__version__ = "0.1.0"

from lungmask_kit.errors import LungkitError  # noqa: E402

__all__ = ["LungkitError", "__version__"]
