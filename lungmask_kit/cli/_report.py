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
