"""The Ray engine: a job's read / model / write stages on Ray Data, for runs across machines (extra `lungkit[ray]`).

It knows nothing of lungs or models. A job hands it `RayStages`: a CPU task that reads a batch of items, an actor
class that holds the job's model (one per actor, one GPU per actor on GPU nodes) and computes a batch, and a CPU task
that writes a batch and returns its finished rows as JSON text in a "row" column; the driver gives those rows to
`record` as the local engine does. Batches cross stages as dicts of numpy columns. Inputs and outputs must be on a
filesystem every node sees, at the same path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lungmask_kit.errors import LungkitError

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


def actor_device_type(address: str | None, device: str) -> str:
    """Where model actors run: CUDA when the cluster has GPUs (unless `device` is "cpu"), else CPU."""
    connect(address)
    gpus = _ray().cluster_resources().get("GPU", 0)
    return "cuda" if gpus >= 1 and device != "cpu" else "cpu"


def plain(value):
    """`json.dumps(default=plain)`: numpy scalars and arrays in a row -> JSON (rows cross stages as text; floats
    round-trip exactly)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} in a row")


@dataclass(frozen=True)
class RayStages:
    read: Callable[..., dict]  # (batch of items, **read_kwargs) -> batch for the model
    model: type  # constructed with (device_type, *model_args) once per actor, called with a batch
    write: Callable[..., dict]  # (batch, **write_kwargs) -> {"row": JSON rows}
    model_args: tuple = ()
    read_kwargs: dict = field(default_factory=dict)
    write_kwargs: dict = field(default_factory=dict)


def run_stages(items: list[dict], stages: RayStages, address: str | None, device: str, batch_size: int,
               record: Callable[[list[dict]], None], bar) -> None:
    """Drive the stages over `items` (dicts of plain values); `record` gets the rows in batches, in no particular
    order. A LungkitError raised in a stage stops the run with its message."""
    if not items:  # e.g. a shard that holds no image
        return
    ray = _ray()
    connect(address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job's own bar counts the rows the driver records
    ctx.log_internal_stack_trace_to_stdout = False
    device_type = actor_device_type(address, device)
    n_gpus = int(ray.cluster_resources().get("GPU", 0)) if device_type == "cuda" else 0
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch_size, 4 * cpus)))
    ds = ds.map_batches(stages.read, fn_kwargs=stages.read_kwargs, batch_size=batch_size, num_cpus=1)
    ds = ds.map_batches(
        # Ray logs one "constructor arguments in the object store" line per run for any actor pool (seen with
        # Ray 2.60, ray-project/ray#57733): harmless
        stages.model, fn_constructor_args=(device_type, *stages.model_args),
        # the memory request is the model's working set; it also keeps Ray from fusing the read tasks into the
        # model actors (a GPU actor decoding on its one CPU would starve the GPU)
        batch_size=batch_size, num_gpus=1 if n_gpus else 0, num_cpus=1, memory=_MODEL_MEMORY,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(n_gpus, 1 if n_gpus else max(1, cpus // 8))),
    )
    ds = ds.map_batches(stages.write, fn_kwargs=stages.write_kwargs, batch_size=_ROWS_PER_WRITE, num_cpus=1)
    try:
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            rows = [json.loads(r) for r in batch["row"]]
            record(rows)
            bar.update(len(rows))
    except ray.exceptions.RayError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, LungkitError):
            raise LungkitError(str(cause)) from None
        raise
