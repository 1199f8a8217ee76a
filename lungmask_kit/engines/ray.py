"""The segment units on Ray Data, for runs across machines (`lungkit segment --engine ray`, extra `lungkit[ray]`).

The paths become a Ray dataset; CPU tasks read, hash, decode and prepare each image (`ImageReader`); an actor
pool runs the model (one model per actor, one GPU per actor on GPU nodes); CPU tasks write the outputs
(`OutputWriter`), and the driver records the rows as manifest parts exactly as the local engine does, so the
manifest, resume and the bytes written are the same. Full-size pixels are not shipped between stages: the write
task decodes the image again (cheaper than moving megabytes of pixels between machines). Inputs and OUT must be
on a filesystem every node sees, at the same path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lungmask_kit.errors import LungkitError
from lungmask_kit.manifest import SegmentRow
from lungmask_kit.segment.steps import ImagePrediction, ImageReader, OutputWriter, Task

_ROWS_PER_WRITE = 16  # rows per write task
_MODEL_MEMORY = 1 << 30  # bytes a model actor reserves (weights and activations of a batch on the CPU)


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise LungkitError("--engine ray needs Ray Data: pip install 'lungkit[ray]'") from None
    return ray


def connect(address: str | None) -> None:
    """Join the cluster at `address` (None: RAY_ADDRESS, else a local instance); quiet, no dashboard."""
    ray = _ray()
    for name in ("ray", "ray.data"):  # Ray Data's per-run INFO lines would flood the terminal
        logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False,
                 configure_logging=True)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise LungkitError(f"cannot start or join Ray{f' at {address}' if address else ''}: {err}") from err


@dataclass(frozen=True)
class RaySettings:
    """What the Ray engine needs to know of a run (not the job's options): where the cluster is, where the model
    runs, and how."""

    address: str | None  # None: RAY_ADDRESS, else a local instance
    device: str  # the user's --device: "cpu" keeps the model off the cluster's GPUs
    batch_size: int
    tta: bool
    weights: str | None  # absolute (every node opens it at the same path); None: the bundled model
    convention: str
    precision: str


def model_device_type(address: str | None, device: str) -> str:
    """Where the model actors run: CUDA when the cluster has GPUs (unless --device cpu), else CPU."""
    connect(address)
    gpus = _ray().cluster_resources().get("GPU", 0)
    return "cuda" if gpus >= 1 and device != "cpu" else "cpu"


def _plain(value):
    """numpy scalars and arrays in a row -> JSON (the row crosses stages as text; floats round-trip exactly)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} in a manifest row")


def _decode(batch: dict, reader: ImageReader) -> dict:
    c = reader.config
    n = len(batch["rel"])
    x = np.zeros((n, c.in_channels, c.input_size, c.input_size), np.float32)
    rows, has_input = [], np.zeros(n, bool)
    for i in range(n):
        item = reader.read(Task(str(batch["rel"][i]), str(batch["out_name"][i]), batch["done"][i] or None))
        if item.model_input is not None:
            x[i], has_input[i] = item.model_input, True
        rows.append(json.dumps(item.row, default=_plain))
    return {"rel": batch["rel"], "out_name": batch["out_name"], "row": np.array(rows, dtype=object), "has_input": has_input, "x": x}


class _Model:
    """One loaded model per actor; checks it holds the weights the driver hashed (nodes may differ)."""

    def __init__(self, weights, device_type: str, weights_sha256: str, pad_to: int, tta: bool, convention: str,
                 precision: str):
        from lungmask_kit.inference import Segmenter
        from lungmask_kit.runtime import prepare_device

        # the decode tasks prepared the inputs on their CPUs
        self.segmenter = Segmenter(weights, prepare_device(device_type), convention, precision, prepare_on_device=False)
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
        rows.append(json.dumps(row, default=_plain))
    return {"row": np.array(rows, dtype=object)}


def run_ray(reader: ImageReader, writer: OutputWriter, weights_sha256: str, tasks: list[Task], settings: RaySettings,
            pad_to: int, record: Callable[[list[dict]], None], bar) -> None:
    """Drive the segment units on Ray Data; `record` gets the rows in batches, in no particular order."""
    if not tasks:  # e.g. a shard that holds no image
        return
    ray = _ray()
    connect(settings.address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # lungkit's own bar counts the rows the driver records
    ctx.log_internal_stack_trace_to_stdout = False
    device_type = model_device_type(settings.address, settings.device)
    n_gpus = int(ray.cluster_resources().get("GPU", 0)) if device_type == "cuda" else 0
    cpus = int(ray.cluster_resources().get("CPU", 1))
    items = [{"rel": t.rel, "out_name": t.out_name, "done": t.done_sha256 or ""} for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // settings.batch_size, 4 * cpus)))
    ds = ds.map_batches(_decode, fn_kwargs={"reader": reader}, batch_size=settings.batch_size, num_cpus=1)
    ds = ds.map_batches(
        # Ray logs one "constructor arguments in the object store" line per run for any actor pool (seen with
        # Ray 2.60, ray-project/ray#57733): harmless
        _Model, fn_constructor_args=(settings.weights, device_type, weights_sha256, pad_to, settings.tta,
                                    settings.convention, settings.precision),
        # the memory request is the model's working set; it also keeps Ray from fusing the decode tasks into
        # the model actors (a GPU actor decoding on its one CPU would starve the GPU)
        batch_size=settings.batch_size, num_gpus=1 if n_gpus else 0, num_cpus=1, memory=_MODEL_MEMORY,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(n_gpus, 1 if n_gpus else max(1, cpus // 8))),
    )
    ds = ds.map_batches(_write, fn_kwargs={"reader": reader, "writer": writer}, batch_size=_ROWS_PER_WRITE, num_cpus=1)
    try:
        for batch in ds.iter_batches(batch_size=settings.batch_size, batch_format="numpy"):
            rows = [json.loads(r) for r in batch["row"]]
            record(rows)
            bar.update(len(rows))
    except ray.exceptions.RayError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, LungkitError):
            raise LungkitError(str(cause)) from None
        raise
