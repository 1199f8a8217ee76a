"""`lungkit stats`: the dataset mean/std a model config needs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lungmask_kit import defaults
from lungmask_kit.cli._options import QuietOpt


def stats(
    input_dir: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).", metavar="DIR")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the statistics as JSON here (default: print only).")] = None,
    size: Annotated[int, typer.Option("--size", min=8, help="Images are resized to SIZE x SIZE first, as the model sees them.")] = defaults.INPUT_SIZE,
    glob: Annotated[str | None, typer.Option("--glob", help="Only paths matching this pattern.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Pixel mean and std (pixels scaled to [0, 1] by bit depth) over a folder, at model resolution.

    Example: lungkit stats data/train/images -o stats.json
    """
    import cv2
    from tqdm.auto import tqdm

    from lungmask_kit.discovery import find_images
    from lungmask_kit.errors import NoImagesError
    from lungmask_kit.fileio import atomic_write_bytes
    from lungmask_kit.imaging import ImageDecodeError, read_gray, to_unit_range
    from lungmask_kit.stats import pixel_mean_std

    rels = find_images(input_dir, glob)
    if not rels:
        raise NoImagesError(f"no images found under {input_dir}")
    skipped: list[str] = []

    def images():
        for rel in tqdm(rels, disable=quiet, unit="img"):
            try:
                yield to_unit_range(cv2.resize(read_gray(input_dir / rel), (size, size), interpolation=cv2.INTER_AREA))
            except (OSError, ImageDecodeError) as err:
                skipped.append(f"{rel}: {err}")

    mean, std, n = pixel_mean_std(images())
    result = {"mean": round(mean, 6), "std": round(std, 6), "n_images": n, "n_skipped": len(skipped), "size": size}
    text = json.dumps(result, indent=2)
    if out:
        atomic_write_bytes(out, text.encode())
    typer.echo(text)
    for s in skipped[:10]:
        typer.echo(f"lungkit: skipped {s}", err=True)


def register(app: typer.Typer) -> None:
    app.command("stats")(stats)
