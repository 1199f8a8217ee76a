"""The one training loop lungkit has: the segmenter's trainer and the classifier audit both run their epochs
through `train_epoch` (channels_last batches, bf16 autocast on CUDA, a progress bar with the running loss)."""

from __future__ import annotations

import logging
from typing import Callable

import torch
from tqdm.auto import tqdm

# progress lines go here unless the caller passes `log` (the CLI passes typer.echo); silent by default
logger = logging.getLogger(__name__)


def train_epoch(model, loader, compute_loss: Callable, optimizer, device, desc: str = "", progress: bool = True,
                before_step: Callable[[int], None] | None = None, after_step: Callable[[int], None] | None = None,
                autocast: torch.dtype | None = "device") -> float:
    """One pass over `loader`; `compute_loss(logits, targets)`; `before_step(i)` / `after_step(i)` around each
    optimiser step (a learning-rate schedule); `autocast`: the forward pass's dtype (None: fp32; the default
    "device": bf16 on CUDA only). Returns the mean loss per sample."""

    if autocast == "device":
        autocast = torch.bfloat16 if device.type == "cuda" else None
    model.train()
    running, seen = 0.0, 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for i, (x, y) in enumerate(bar):
        if before_step is not None:
            before_step(i)
        x, y = x.to(device, memory_format=torch.channels_last), y.to(device)
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = model(x)
        loss = compute_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(i)
        running += loss.item() * len(x)
        seen += len(x)
        bar.set_postfix(loss=f"{running / seen:.4f}")
    return running / max(seen, 1)


def fit(model, loader, compute_loss: Callable, optimizer, device, epochs: int, scheduler=None, progress: bool = True,
        log: Callable[[str], None] = logger.info, label: str = "", autocast: torch.dtype | None | str = "device") -> list[float]:
    """`epochs` passes with a per-step scheduler; returns the mean loss of each epoch. `autocast` as in
    `train_epoch`."""
    model.to(device).to(memory_format=torch.channels_last)
    total = epochs * max(1, len(loader))

    def step_schedule(_: int) -> None:
        if scheduler is not None and scheduler.last_epoch < total:
            scheduler.step()

    losses = []
    for epoch in range(epochs):
        losses.append(train_epoch(model, loader, compute_loss, optimizer, device, f"{label} epoch {epoch + 1}/{epochs}",
                                  progress, after_step=step_schedule, autocast=autocast))
        log(f"{label}: epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f}")
    return losses
