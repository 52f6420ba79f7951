"""A run's saved state, written and read in one place (as RecBole's trainer does): the best weights
(model.safetensors, what warm starts and the quality gate use, and publish unless the run has the
refit's, refit.safetensors) and the resumable checkpoint (checkpoint.pt: weights, optimizer, loop state,
torch RNG and the run's init record, after the latest epoch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bridgerec.models.base import Recommender
from bridgerec.models.optim import Optimizer
from bridgerec.models.trainer import FitState
from bridgerec.storage.files import atomic_path
from bridgerec.storage.runs import RunDir


def save_weights(model: torch.nn.Module, run: RunDir, path: Path | None = None) -> None:
    """The best weights so far -> model.safetensors, or to `path` (the refit's), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path or run.model) as tmp:
        save_file(tensors, str(tmp))


def load_weights(model: torch.nn.Module, run: RunDir, device: torch.device | str = "cpu") -> None:
    """model.safetensors -> `model` (strict: every tensor, and no other)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(run.model), device=str(device)), strict=True)


@dataclass
class Checkpoint:
    """What checkpoint.pt holds."""

    model: dict[str, torch.Tensor]
    optimizer: list[dict]
    state: FitState
    torch_rng: torch.Tensor
    init: dict[str, Any]


def save_checkpoint(
    run: RunDir, model: Recommender, optimizer: Optimizer, state: FitState, init: dict[str, Any]
) -> None:
    """Everything to continue after the latest finished epoch -> checkpoint.pt (atomic)."""
    with atomic_path(run.checkpoint) as tmp:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": state.__dict__,
                "torch_rng": torch.get_rng_state(),  # dropout draws continue as if never interrupted
                "init": init,
            },
            tmp,
        )


def load_checkpoint(run: RunDir, device: torch.device | str = "cpu") -> Checkpoint | None:
    """checkpoint.pt of an interrupted run, or None when there is none."""
    if not run.checkpoint.exists():
        return None
    raw = torch.load(run.checkpoint, map_location=device, weights_only=False)
    return Checkpoint(
        raw["model"], raw["optimizer"], FitState(**raw["state"]), raw["torch_rng"], raw.get("init", {})
    )


def restore(model: Recommender, ckpt: Checkpoint) -> None:
    """Weights and RNG of a checkpoint into a freshly built model (the optimizer state goes to `fit`)."""
    model.load_state_dict(ckpt.model)
    torch.set_rng_state(ckpt.torch_rng)
