"""Structures a segmenter draws: each module owns its finishing step (probability or drawn mask -> finished mask)
and its manifest fields, so `segment`, `variants` and `evaluate` share one definition: `lungs` (the two lungs and
their columns), `heart` (the heart and the cardiothoracic ratio)."""
