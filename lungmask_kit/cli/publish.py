"""`lungkit publish`: a run folder as a dataset others can load, verify and cite."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungmask_kit.cli._options import InputRootOpt, QuietOpt


def publish(
    run: Annotated[Path, typer.Argument(help="A segment or variants output folder (or its manifest.parquet).", metavar="OUT")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder (replaced whole when lungkit made it).")],
    masks_only: Annotated[bool, typer.Option("--masks-only", help="Masks as COCO RLE with each source image's path and sha256; no image (for sources that may not be redistributed).")] = False,
    include_flagged: Annotated[bool, typer.Option("--include-flagged", help="Also publish QC-flagged images (failed ones never).")] = False,
    name: Annotated[str | None, typer.Option("--name", help="Dataset name in the card and croissant.json (default: OUT's folder name).")] = None,
    license: Annotated[str | None, typer.Option("--license", help="Licence id for the card, e.g. cc-by-4.0 (default: from the manifest's license column).")] = None,
    shard_mb: Annotated[int, typer.Option("--shard-mb", min=1, help="Parquet shard size in MB of image bytes.")] = 500,
    chexmask: Annotated[bool, typer.Option("--chexmask", help="Also write chexmask.csv: the masks in CheXmask's layout (right and left lung run-length strings), est_dice in its Dice RCA (Mean) column.")] = False,
    keep_identifiers: Annotated[bool, typer.Option("--keep-identifiers", help="Publish patient_id and the DICOM study/series/SOP UIDs as they are (default: replaced by pseudonyms that still group a patient's images).")] = False,
    input_root: InputRootOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Publish a run: Parquet shards per split (Hugging Face Image features for image, mask, lungs, nolungs) or,
    with --masks-only, COCO RLE masks; a dataset card (README.md), croissant.json and SHA256SUMS.

    Examples:

      lungkit publish out/cxr-seg -o datasets/cxr-seg-lungs --license cc-by-4.0

      lungkit publish out/mimic -o datasets/mimic-lung-masks --masks-only
    """
    from lungmask_kit.publish import PublishOptions
    from lungmask_kit.publish import publish as run_publish

    options = PublishOptions(masks_only=masks_only, include_flagged=include_flagged, name=name, license=license,
                             shard_mb=shard_mb, input_root=input_root, keep_identifiers=keep_identifiers, chexmask=chexmask,
                             progress=not quiet)
    s = run_publish(run, out, options)
    if not quiet:
        splits = ", ".join(f"{k} {v}" for k, v in sorted(s.rows.items()))
        typer.echo(f"published {sum(s.rows.values())} image(s) ({splits}) in {s.mode} mode to {s.folder}: {s.files} files, "
                   f"{s.total_bytes / 2**20:.1f} MiB, {s.seconds:.1f} s; left out {s.excluded_flagged} flagged, "
                   f"{s.excluded_failed} failed" + (f"; resumed {s.resumed_shards} shard(s)" if s.resumed_shards else ""))
        if s.pseudonymised:
            typer.echo(f"identifiers replaced by pseudonyms: {', '.join(s.pseudonymised)} (--keep-identifiers keeps them)")
        typer.echo(f"check it with: cd {s.folder} && sha256sum -c SHA256SUMS")
    for warning in s.warnings:
        typer.echo(f"lungkit: warning: {warning}", err=True)


def register(app: typer.Typer) -> None:
    app.command("publish")(publish)
