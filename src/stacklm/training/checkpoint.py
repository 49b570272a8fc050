"""Checkpoints: `step_NNNNNNNN/model.safetensors` + `trainer_state.pt`, written atomically.

A checkpoint is assembled in a temporary directory and renamed into place, then `latest` is
replaced atomically; a crash at any point leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from stacklm.errors import UserError

WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class _StateDict(nn.Module):
    """A module standing for a state dict, for safetensors' `save_model` (which drops the names
    of shared tensors, such as tied embeddings, as `load_model` expects)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self.state = state

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return dict(self.state)


class Checkpointer:
    def __init__(self, directory: str | Path, keep_last: int = 2):
        self.directory = Path(directory)
        self.keep_last = keep_last

    def save(self, step: int, model: nn.Module | dict[str, torch.Tensor], state: dict) -> Path:
        """`model`: the module, or its state dict (e.g. gathered from sharded ranks)."""
        if isinstance(model, dict):
            model = _StateDict(model)
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(model, str(tmp / WEIGHTS), metadata={"step": str(step)})
        torch.save(state, tmp / STATE)
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        write_text_atomic(self.directory / "latest", final.name)
        self.prune()
        return final

    def prune(self) -> None:
        for old in self.all()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def all(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("step_*") if (p / WEIGHTS).exists())

    def latest(self) -> Path | None:
        pointer = self.directory / "latest"
        if pointer.exists():
            path = self.directory / pointer.read_text().strip()
            if (path / WEIGHTS).exists():
                return path
        found = self.all()
        return found[-1] if found else None


def load_weights(model: nn.Module, checkpoint: str | Path) -> None:
    path = Path(checkpoint) / WEIGHTS
    if not path.exists():
        raise UserError(f"no weights at {path}")
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not fit the model of its config: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}")


def load_state(checkpoint: str | Path, mmap: bool = False) -> dict:
    """The trainer state; with `mmap` its tensors are mapped from the file, read only if used."""
    return torch.load(Path(checkpoint) / STATE, map_location="cpu", weights_only=True, mmap=mmap)
