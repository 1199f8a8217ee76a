"""Structures a segmenter draws beside the lungs: each module owns its finishing step (probability -> mask) and
its manifest fields, so `segment`, `variants` and `evaluate` share one definition."""
