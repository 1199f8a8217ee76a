"""The fixed choices of the commands' settings, as Enums (the CLI offers exactly these; the library checks them).
Kept free of heavy imports so that the command line starts fast."""

from __future__ import annotations

from enum import Enum


class VariantChoice(str, Enum):
    """Which variants `classify` trains on (`all`: the three)."""
    original = "original"
    lungs = "lungs"
    nolungs = "nolungs"
    all = "all"


class Normalization(str, Enum):
    dataset = "dataset"  # mean/std of the training split
    imagenet = "imagenet"


class Channels(str, Enum):
    gray = "gray"  # one channel
    rgb = "rgb"  # gray replicated to three


class EncoderWeights(str, Enum):
    none = "none"  # random initialisation: works offline
    imagenet = "imagenet"  # downloaded by segmentation_models_pytorch (needs the network)


class Init(str, Enum):
    scratch = "scratch"  # random initialisation
    imagenet = "imagenet"  # timm's ImageNet weights (needs the network)
    segmenter = "segmenter"  # the bundled segmenter's DenseNet121 encoder (chest X-rays; offline)


class CacheKind(str, Enum):
    memory = "memory"
    disk = "disk"  # memory-mapped under OUT/.cache, removed at the end


class Engine(str, Enum):
    local = "local"  # threads in this process
    ray = "ray"  # Ray Data across a cluster (extra lungkit[ray])


class Convention(str, Enum):
    """Which lung a mask outlines: the two annotation conventions of public lung masks."""
    v7 = "v7"  # the whole lung, behind the heart and below the dome included (V7 Labs, lungkit's default)
    jsrt = "jsrt"  # the visible lung fields only (JSRT/SCR, NLM Montgomery and Shenzhen, CheXmask)


CONVENTIONS = tuple(c.value for c in Convention)

# what a segmenter may draw beside the lungs, one output channel each (the heart: lungkit's CTR)
STRUCTURES = ("heart",)


class Precision(str, Enum):
    auto = "auto"  # bf16 where the device computes it in hardware, fp32 elsewhere
    fp32 = "fp32"
    bf16 = "bf16"


class Runtime(str, Enum):
    """What runs the network (`lungmask_kit.runtimes`)."""
    auto = "auto"  # torch on a GPU and on CPUs with bf16 units; OpenVINO f32 on other CPUs
    torch = "torch"
    openvino = "openvino"  # CPU only; fp32 (or bf16 on a CPU with bf16 units)
