"""The segment units on the Ray engine (`lungkit segment --engine ray`, extra `lungkit[ray]`).

CPU tasks read, hash, decode and prepare each image (`ImageReader`); an actor pool runs the model (`_Model`, one
`Segmenter` per actor); CPU tasks write the outputs (`OutputWriter`), and the driver records the rows as manifest
parts exactly as the local engine does, so the manifest, resume and the bytes written are the same. Full-size
pixels are not shipped between stages: the write task decodes the image again (cheaper than moving megabytes of
pixels between machines).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lungmask_kit.engines.ray import RayStages, plain, run_stages
from lungmask_kit.errors import LungkitError
from lungmask_kit.manifest import SegmentRow
from lungmask_kit.runtime import prepare_device
from lungmask_kit.segment.steps import ImagePrediction, ImageReader, OutputWriter, Task


@dataclass(frozen=True)
class RaySettings:
    """What the Ray engine needs to know of a segment run (not the job's options): where the cluster is, where the
    model runs, and how."""

    address: str | None  # None: RAY_ADDRESS, else a local instance
    device: str  # the user's --device: "cpu" keeps the model off the cluster's GPUs
    batch_size: int
    tta: bool
    weights: str | None  # absolute (every node opens it at the same path); None: the bundled model
    convention: str
    precision: str
    runtime: str  # as chosen for the actors' device (runtimes.choose_runtime)


def _decode(batch: dict, reader: ImageReader) -> dict:
    c = reader.config
    n = len(batch["rel"])
    x = np.zeros((n, c.in_channels, c.input_size, c.input_size), np.float32)
    rows, has_input = [], np.zeros(n, bool)
    for i in range(n):
        item = reader.read(Task(str(batch["rel"][i]), str(batch["out_name"][i]), batch["done"][i] or None))
        if item.model_input is not None:
            x[i], has_input[i] = item.model_input, True
        rows.append(json.dumps(item.row, default=plain))
    return {"rel": batch["rel"], "out_name": batch["out_name"], "row": np.array(rows, dtype=object), "has_input": has_input, "x": x}


class _Model:
    """One loaded model per actor; checks it holds the weights the driver hashed (nodes may differ)."""

    def __init__(self, device_type: str, weights, weights_sha256: str, pad_to: int, tta: bool, convention: str,
                 precision: str, runtime: str):
        # torch is imported by the model actors only, never by the read and write tasks
        from lungmask_kit.inference import Segmenter

        # the decode tasks prepared the inputs on their CPUs
        self.segmenter = Segmenter(weights, prepare_device(device_type), convention, precision, prepare_on_device=False,
                                   runtime=runtime)
        if self.segmenter.weights_sha256 != weights_sha256:
            raise LungkitError("a Ray worker loaded other weights than the driver (weights differ between nodes)")
        self.pad_to, self.tta = pad_to, tta

    def __call__(self, batch: dict) -> dict:
        n = len(batch["rel"])
        s = self.segmenter.config.input_size
        probs = np.zeros((n, s, s), np.float32)
        extra = {name: np.zeros((n, s, s), np.float32) for name in self.segmenter.extra_outputs}
        pooled = flipped = None
        idx = np.flatnonzero(batch["has_input"])
        if len(idx):
            pred = self.segmenter.predict_batch(batch["x"][idx], pad_to=self.pad_to, tta=self.tta)
            probs[idx] = pred.probabilities
            for name, values in pred.extra.items():
                extra[name][idx] = values
            pooled = np.zeros((n, pred.pooled.shape[1]), np.float32)
            pooled[idx] = pred.pooled
            if pred.flipped is not None:
                flipped = np.zeros((n, s, s), np.float32)
                flipped[idx] = pred.flipped
        out = {k: batch[k] for k in ("rel", "out_name", "row", "has_input")}
        out["probability"] = probs
        out["pooled"] = pooled if pooled is not None else np.zeros((n, 1), np.float32)
        out["flipped"] = flipped if flipped is not None else np.zeros((n, 1, 1), np.float32)
        out["has_flipped"] = np.full(n, flipped is not None)
        out.update({f"extra_{name}": values for name, values in extra.items()})
        return out


def _write(batch: dict, reader: ImageReader, writer: OutputWriter) -> dict:
    rows = []
    for i in range(len(batch["rel"])):
        row = SegmentRow(json.loads(batch["row"][i]))
        if batch["has_input"][i]:
            task = Task(str(batch["rel"][i]), str(batch["out_name"][i]))
            flipped = batch["flipped"][i] if batch["has_flipped"][i] else None
            extra = {k[len("extra_"):]: v[i] for k, v in batch.items() if k.startswith("extra_")}
            try:
                pixels = reader.pixels(task, row["sha256"])
                prediction = ImagePrediction(batch["probability"][i], batch["pooled"][i], flipped, extra)
                row = writer.write(task, row, pixels, prediction)
            except LungkitError:
                raise
            except Exception as err:  # costs this image only, as in the local engine
                row = writer.failed(row, err)
        rows.append(json.dumps(row, default=plain))
    return {"row": np.array(rows, dtype=object)}


def run_ray(reader: ImageReader, writer: OutputWriter, weights_sha256: str, tasks: list[Task], settings: RaySettings,
            pad_to: int, record: Callable[[list[dict]], None], bar) -> None:
    """Drive the segment units on Ray Data; `record` gets the rows in batches, in no particular order."""
    s = settings
    stages = RayStages(_decode, _Model, _write,
                       model_args=(s.weights, weights_sha256, pad_to, s.tta, s.convention, s.precision, s.runtime),
                       read_kwargs={"reader": reader}, write_kwargs={"reader": reader, "writer": writer})
    items = [{"rel": t.rel, "out_name": t.out_name, "done": t.done_sha256 or ""} for t in tasks]
    run_stages(items, stages, s.address, s.device, s.batch_size, record, bar)
