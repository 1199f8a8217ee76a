"""Model config (data), a small factory, and weights as safetensors + JSON config (never pickles)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from lungmask_kit import defaults
from lungmask_kit.choices import CONVENTIONS, STRUCTURES
from lungmask_kit.errors import LungkitError, WeightsError
from lungmask_kit.fileio import atomic_write_bytes

DEFAULT_WEIGHTS = Path(__file__).parent / "default" / "model.safetensors"
CONFIG_FORMAT = "lungkit-model/1"


@dataclasses.dataclass
class ModelConfig:
    """Everything needed to rebuild a model and prepare its input; stored next to the weights."""

    name: str = "lungkit-segmenter"
    task: str = "segmentation"  # or "classification"
    arch: str = defaults.SEGMENTER["arch"]
    encoder: str = defaults.SEGMENTER["encoder"]
    in_channels: int = defaults.SEGMENTER["in_channels"]
    classes: int = defaults.SEGMENTER["classes"]
    input_size: int = defaults.SEGMENTER["input_size"]
    # Normalisation applied to pixel values scaled to [0, 1] by the image's bit depth.
    mean: list[float] = dataclasses.field(default_factory=lambda: [0.5])
    std: list[float] = dataclasses.field(default_factory=lambda: [0.25])
    threshold: float = defaults.THRESHOLD
    # the annotation convention of each output channel (choices.Convention), one per class of a segmenter
    conventions: list[str] = dataclasses.field(default_factory=lambda: [defaults.CONVENTION])
    # structures beyond the lungs (choices.STRUCTURES: "heart"), one output channel each after the conventions'
    structures: list[str] = dataclasses.field(default_factory=list)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the input gate and est_dice fitted for this model (lungmask_kit.quality); None: not calibrated
    quality: dict[str, Any] | None = None
    format: str = CONFIG_FORMAT

    def output_index(self, convention: str) -> int:
        """The output channel that draws masks in `convention`."""
        if convention not in self.conventions:
            raise WeightsError(f"model {self.name!r} has no output for the {convention!r} convention "
                               f"(it draws: {', '.join(self.conventions)})")
        return self.conventions.index(convention)

    @property
    def outputs(self) -> list[str]:
        """The name of each output channel, in order: the lung conventions, then the other structures."""
        return [*self.conventions, *self.structures]

    def structure_index(self, structure: str) -> int | None:
        """The output channel that draws `structure` ("heart"), or None where the model has none."""
        return len(self.conventions) + self.structures.index(structure) if structure in self.structures else None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise WeightsError(f"model config has unknown keys {sorted(unknown)}")
        cfg = cls(**data)
        problem = cfg.problem()
        if problem:
            raise WeightsError(f"model config: {problem}")
        return cfg

    def problem(self) -> str | None:
        """What is wrong with this config's types and ranges (checked at load, before any image), or None."""
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")

        def integer(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for key in ("name", "task", "arch", "encoder"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                return f"{key} must be a non-empty string"
        if self.task not in ("segmentation", "classification"):
            return f"task must be segmentation or classification, not {self.task!r}"
        if not integer(self.in_channels) or not 1 <= self.in_channels <= 4:
            return f"in_channels must be an integer from 1 to 4, not {self.in_channels!r}"
        if not integer(self.classes) or self.classes < 1:
            return f"classes must be a positive integer, not {self.classes!r}"
        if not integer(self.input_size) or not 8 <= self.input_size <= 4096:
            return f"input_size must be an integer from 8 to 4096, not {self.input_size!r}"
        if self.task == "segmentation" and self.input_size % 32:  # the encoders downsample 32-fold
            return f"input_size of a segmenter must be a multiple of 32, not {self.input_size}"
        for key in ("mean", "std"):
            values = getattr(self, key)
            if not isinstance(values, list) or not values or not all(number(v) for v in values):
                return f"{key} must be a list of numbers, not {values!r}"
        if any(v <= 0 for v in self.std):
            return f"std must be positive, not {self.std!r}"
        if len(self.mean) not in (1, self.in_channels) or len(self.std) != len(self.mean):
            return f"mean/std ({self.mean}, {self.std}) do not match in_channels={self.in_channels}"
        if not number(self.threshold) or not 0 < self.threshold < 1:
            return f"threshold must be a number between 0 and 1, not {self.threshold!r}"
        if self.task == "segmentation":
            known = set(CONVENTIONS)
            if not isinstance(self.structures, list) or not set(self.structures) <= set(STRUCTURES) \
                    or len(set(self.structures)) != len(self.structures):
                return f"structures must list distinct structures ({', '.join(STRUCTURES)}), not {self.structures!r}"
            lungs = self.classes - len(self.structures)
            if not isinstance(self.conventions, list) or not self.conventions or not set(self.conventions) <= known \
                    or len(set(self.conventions)) != len(self.conventions) or len(self.conventions) != lungs:
                return (f"conventions must list one distinct convention ({', '.join(sorted(known))}) per lung output "
                        f"channel ({lungs}), not {self.conventions!r}")
        if not isinstance(self.provenance, dict) or not (self.quality is None or isinstance(self.quality, dict)):
            return "provenance and quality must be JSON objects"
        return None


def build_model(config: ModelConfig, encoder_weights: str | None = None) -> torch.nn.Module:
    """Build the network a config describes. `encoder_weights="imagenet"` needs the network."""
    if config.task == "classification":
        import timm

        try:
            return timm.create_model(
                config.arch,
                pretrained=encoder_weights == "imagenet",
                in_chans=config.in_channels,
                num_classes=config.classes,
            )
        except RuntimeError as err:
            raise LungkitError(f"cannot build classifier {config.arch!r}: {err}") from err
        except OSError as err:
            raise LungkitError(_offline_message(config.arch, err)) from err

    import segmentation_models_pytorch as smp

    try:
        return smp.create_model(
            config.arch,
            encoder_name=config.encoder,
            encoder_weights=encoder_weights,
            in_channels=config.in_channels,
            classes=config.classes,
        )
    except (KeyError, ValueError) as err:
        raise LungkitError(f"cannot build {config.arch} with encoder {config.encoder!r}: {err}") from err
    except OSError as err:  # urllib / requests / huggingface_hub connection errors are OSErrors
        raise LungkitError(_offline_message(config.encoder, err)) from err


def _offline_message(name: str, err: Exception) -> str:
    return (
        f"could not download pretrained weights for {name!r} ({type(err).__name__}: {err}). "
        "Pretrained weights need the network; offline, train from scratch with --encoder-weights none "
        "(or --no-pretrained for classify)."
    )


def _config_path(weights: Path) -> Path:
    return weights.with_suffix(".json") if weights.name != "model.safetensors" else weights.parent / "config.json"


def resolve_weights(path: str | Path | None) -> Path:
    """A weights file: the default, a .safetensors file, or a folder holding model.safetensors."""
    weights = DEFAULT_WEIGHTS if path is None else Path(path)
    if weights.is_dir():
        weights = weights / "model.safetensors"
    if not weights.is_file():
        hint = " (the packaged default model is missing: reinstall lungkit)" if path is None else ""
        raise WeightsError(f"weights file not found: {weights}{hint}")
    if weights.suffix != ".safetensors":
        raise WeightsError(f"weights must be a .safetensors file (no pickles are loaded): {weights}")
    return weights


def save_model(
    model: torch.nn.Module, config: ModelConfig, weights: str | Path, dtype: torch.dtype = torch.float32,
    quality_tensors: dict[str, Any] | None = None,
) -> Path:
    """Write `weights` (.safetensors) and its JSON config atomically. Returns the weights path.

    The config's quality statistics are kept only with their tensors (`quality_tensors`, as `load_bundle`
    returns them); without them the copy is saved uncalibrated rather than inconsistent."""
    from safetensors.torch import save

    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    if quality_tensors:
        state.update({k: torch.as_tensor(v).contiguous() for k, v in quality_tensors.items()})
    elif config.quality and {"image", "view"} & set(config.quality):
        config = dataclasses.replace(config, quality=None)
    payload = save(state, metadata={"format": CONFIG_FORMAT, "name": config.name})
    atomic_write_bytes(weights, payload)
    cfg = dataclasses.replace(config, provenance={**config.provenance, "sha256": hashlib.sha256(payload).hexdigest()})
    atomic_write_bytes(_config_path(weights), cfg.to_json().encode())
    return weights


def load_config(weights: str | Path | None = None) -> tuple[ModelConfig, Path]:
    weights = resolve_weights(weights)
    cfg_path = _config_path(weights)
    if not cfg_path.is_file():
        raise WeightsError(f"model config not found next to the weights: {cfg_path}")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"model config {cfg_path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != CONFIG_FORMAT:
        raise WeightsError(f"{cfg_path} is not a lungkit model config (format {CONFIG_FORMAT!r} expected)")
    return ModelConfig.from_dict(data), weights


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    sha256: str
    path: Path
    quality_tensors: dict[str, Any]  # numpy arrays stored as quality.* beside the network's weights


def load_bundle(weights: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load the model in eval mode with its config and the quality statistics stored beside it.
    Verifies the checksum the config records."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from lungmask_kit.quality import TENSOR_PREFIX

    config, weights = load_config(weights)
    payload = weights.read_bytes()
    sha = hashlib.sha256(payload).hexdigest()
    expected = config.provenance.get("sha256")
    if expected and expected != sha:
        raise WeightsError(f"{weights} does not match the sha256 its config records (tampered or mismatched files)")
    try:
        state = load(payload)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{weights} is not a valid safetensors file: {err}") from err
    quality = {k: state.pop(k).float().numpy() for k in [k for k in state if k.startswith(TENSOR_PREFIX)]}
    model = build_model(config)
    reference = model.state_dict()
    state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0:3]
        raise WeightsError(f"{weights} does not fit a {config.arch}/{config.encoder} model: {' '.join(first)}") from err
    return LoadedModel(model.to(device).eval(), config, sha, weights, quality)


def load_model(weights: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelConfig, str]:
    """Load (model in eval mode, config, weights sha256). Verifies the checksum the config records."""
    loaded = load_bundle(weights, device)
    return loaded.model, loaded.config, loaded.sha256


HEAD_PREFIX = "segmentation_head."  # smp: the last layers, whose output channels are the conventions


def initialise_from(model: torch.nn.Module, config: ModelConfig, source: LoadedModel) -> None:
    """Start a new segmenter from a trained one of the same architecture (fine-tuning saves CPU hours). Each
    output channel takes the source's channel of the same name; a convention or structure the source lacks
    starts from the source's first output, a smooth organ-shaped guess that training then moves."""
    if (source.config.arch, source.config.encoder, source.config.in_channels) != (config.arch, config.encoder, config.in_channels):
        raise LungkitError(f"cannot initialise a {config.arch}/{config.encoder} model with {config.in_channels} "
                           f"input channel(s) from {source.path} ({source.config.arch}/{source.config.encoder}, "
                           f"{source.config.in_channels})")
    rows = [source.config.outputs.index(c) if c in source.config.outputs else 0 for c in config.outputs]
    state = source.model.state_dict()
    target = model.state_dict()
    for key, value in state.items():
        if key.startswith(HEAD_PREFIX) and value.shape[:1] == (source.config.classes,) and value.ndim in (1, 4):
            value = value[rows]
        target[key] = value.to(target[key].dtype)
    model.load_state_dict(target, strict=True)


def attach_quality(weights: str | Path, quality_config: dict, tensors: dict[str, Any]) -> Path:
    """Store refitted quality statistics with existing weights without touching the network's tensors:
    the `quality.*` tensors in the safetensors file are replaced, the config gets `quality` and the new sha256."""
    from safetensors.torch import load, save

    from lungmask_kit.quality import TENSOR_PREFIX

    config, weights = load_config(weights)
    state = {k: v for k, v in load(weights.read_bytes()).items() if not k.startswith(TENSOR_PREFIX)}
    state.update({k: torch.from_numpy(v).contiguous() for k, v in tensors.items()})
    payload = save(state, metadata={"format": CONFIG_FORMAT, "name": config.name})
    atomic_write_bytes(weights, payload)
    cfg = dataclasses.replace(config, quality=quality_config,
                              provenance={**config.provenance, "sha256": hashlib.sha256(payload).hexdigest()})
    atomic_write_bytes(_config_path(weights), cfg.to_json().encode())
    return weights
