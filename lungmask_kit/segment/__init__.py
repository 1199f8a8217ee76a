"""`lungkit segment`: masks, lungs-only and lungs-removed images and a manifest for a folder of CXRs.

- `steps`: the units every engine shares (the settings key, `ImageReader`, `OutputWriter`, `ImagePrediction`);
- `local`: those units on the local engine (`engines.local`), with the nvJPEG path;
- `run`: the job (`SegmentOptions`, `run_segment`, `merge_shards`): discovery, the run folder, the engine, the
  merged manifest. The output folder's locks, resume map and merged manifest are `runfolder`'s.
"""

from lungmask_kit.segment.run import SegmentOptions, merge_shards, quality_thresholds, run_segment
from lungmask_kit.segment.steps import OUTPUT_DIRS, OUTPUT_FORMAT, ImagePrediction, ImageReader, OutputWriter, Task, settings_key

__all__ = ["OUTPUT_DIRS", "OUTPUT_FORMAT", "ImagePrediction", "ImageReader", "OutputWriter", "SegmentOptions", "Task",
           "merge_shards", "quality_thresholds", "run_segment", "settings_key"]
