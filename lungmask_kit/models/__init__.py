"""Segmentation model configs, the factory and safetensors weight I/O."""

from lungmask_kit.models.modeling import (
    DEFAULT_WEIGHTS,
    ModelConfig,
    build_model,
    load_model,
    save_model,
)

__all__ = ["DEFAULT_WEIGHTS", "ModelConfig", "build_model", "load_model", "save_model"]
