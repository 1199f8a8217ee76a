"""`lungkit segment`: masks, lungs-only and lungs-removed images and a manifest for a folder of CXRs.

- `steps`: the units every engine shares (the settings key, `ImageReader`, `OutputWriter`, `ImagePrediction`);
- `local`: those units on the local engine (`engines.local`), with the nvJPEG path;
- `ray`: those units on the Ray engine (`engines.ray`);
- `run`: the job (`SegmentOptions`, `run_segment`, `merge_shards`): discovery, the run folder, the engine, the
  merged manifest. The output folder's locks, resume map and merged manifest are `runfolder`'s.

The job's names load on first use: a Ray read or write task imports `segment.steps` without torch and the model.
"""

from __future__ import annotations

import importlib

_FROM = {
    **dict.fromkeys(("SegmentOptions", "merge_shards", "quality_thresholds", "run_segment"), "run"),
    **dict.fromkeys(("OUTPUT_DIRS", "OUTPUT_FORMAT", "ImagePrediction", "ImageReader", "OutputWriter", "Task",
                     "settings_key"), "steps"),
}
__all__ = sorted(_FROM)


def __getattr__(name: str):
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_FROM[name]}"), name)
