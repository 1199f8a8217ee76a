"""Summary tables printed at the end of a command (stdout; errors go to stderr)."""

from __future__ import annotations

import typer


def table(rows: list[tuple[str, object]], title: str | None = None) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def echo_errors(errors: list[tuple[str, str]], limit: int = 10) -> None:
    for path, message in errors[:limit]:
        typer.echo(f"lungkit: {path}: {message}", err=True)
    if len(errors) > limit:
        typer.echo(f"lungkit: ... and {len(errors) - limit} more (see the manifest's error column)", err=True)


def echo_run_summary(s, title: str) -> None:
    """The end-of-run table of segment / variants (a manifest.RunSummary)."""
    reasons = ", ".join(f"{n} {k}" for k, n in sorted(s.flag_reasons.items(), key=lambda kv: -kv[1]))
    typer.echo(table([
        ("found", s.found),
        *([("ignored (not images lungkit reads)", s.ignored)] if getattr(s, "ignored", "") else []),
        ("skipped (already done)", s.skipped),
        ("ok", s.ok),
        ("flagged by QC", f"{s.flagged}" + (f" ({reasons})" if reasons else "")),
        ("failed", s.failed),
        ("removed (input gone)", s.removed_stale),
        *([("model", s.model)] if getattr(s, "model", "") else []),
        ("time", _time_line(s)),
        ("outputs", ", ".join(s.output_folders) or "-"),
        ("manifest", s.manifest or "-"),
    ], title=title))


def _time_line(s) -> str:
    if not s.processed:  # a resumed run with nothing left to do has no rate to speak of
        return f"{s.seconds:.1f} s in all, model loading included: nothing to process (every image was done before)"
    return (f"{s.seconds:.1f} s in all, model loading included: {s.images_per_second:.2f} images processed per second "
            f"({s.processed} processed; the progress bar counts skipped images too)")


def finish_run(s, quiet: bool, title: str, out, report: bool = False) -> None:
    """Summary, the QC report (--report), warnings and the exit status shared by segment and variants."""
    if not quiet:
        echo_run_summary(s, title)
    if report:
        from lungmask_kit.report import ReportOptions, build_report, default_folder

        echo_report_summary(build_report(out, default_folder(out), ReportOptions(progress=not quiet)), quiet)
    if s.next_step and not quiet:
        typer.echo(s.next_step)
    elif s.flagged and not report and not quiet and s.manifest:
        typer.echo(f"{s.flagged} image(s) flagged by QC: `lungkit report {out}` shows them grouped by reason")
    if s.uncalibrated:
        typer.echo("lungkit: warning: the model has no quality statistics, so ood_score and est_dice are null; "
                   "fit them with `lungkit calibrate`", err=True)
    for warning in s.warnings:
        typer.echo(f"lungkit: warning: {warning}", err=True)
    if s.unmatched_labels:
        typer.echo(f"lungkit: warning: {s.unmatched_labels} label row(s) match no image (listed in {out}/unmatched_labels.csv)", err=True)
    if s.label_conflicts:
        typer.echo(f"lungkit: warning: {s.label_conflicts} label row(s) disagree about one image; those images are left "
                   f"unlabelled (listed in {out}/unmatched_labels.csv)", err=True)
    if s.failed:
        echo_errors(s.errors)
        where = s.manifest or "the manifest `lungkit merge` writes"
        typer.echo(f"lungkit: {s.failed} of {s.found} image(s) failed; details in {where}", err=True)
        raise typer.Exit(1)


def echo_report_summary(s, quiet: bool) -> None:
    if not quiet:
        typer.echo(f"report: {s.index} ({s.pages} pages, {s.images_shown} overlays; {s.flagged} flagged, "
                   f"{s.failed} failed; {s.seconds:.1f} s)")
    if s.unrendered:
        typer.echo(f"lungkit: warning: {s.unrendered} image(s) shown as placeholders: their originals were not found, "
                   "were changed since the run, or lie outside the input folder (give --input-root where they are now; "
                   "each card says why)", err=True)
    for warning in s.warnings:
        typer.echo(f"lungkit: warning: {warning}", err=True)
    if s.no_outline:
        typer.echo(f"lungkit: warning: {s.no_outline} image(s) shown without their mask's outline: the mask is missing, "
                   "unreadable or of another size (each card says which)", err=True)
