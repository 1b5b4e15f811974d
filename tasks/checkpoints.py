"""Self-describing checkpoints: weights plus everything needed to rebuild and use them.

A checkpoint embeds the architecture, class names, the train-split
normalisation statistics, the params it was trained with and the MLflow run
that tracked it, so a ``.pt`` file found on its own still says what it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.artifacts import atomic_path
from tasks.data.pixels import ChannelStats
from tasks.efficientnet import TRUNK_BLOCKS
from tasks.models import InputView, build_model


@dataclass(frozen=True)
class Checkpoint:
    model_name: str
    width: int
    dropout: float
    in_channels: int
    image_size: int
    classes: tuple[str, ...]
    stats: ChannelStats
    params: dict[str, Any]
    metrics: dict[str, float]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    mlflow_run_id: str | None = None
    width_multiplier: float = 1.0
    # Class frequencies seen in training (per epoch, in expectation): the prior
    # that logit adjustment at evaluation divides out.
    class_prior: tuple[float, ...] | None = None
    # How a new image becomes an input (ImageSpec.preprocessing): what predict repeats.
    preprocessing: dict[str, Any] | None = None
    # The resolution a PRETRAINED network runs at (its first layer resizes to it);
    # None: the stored image size.
    input_size: int | None = None
    # efficientnet_lite0_trunk's depth (checkpoints from before it was a param: 6)
    trunk_blocks: int = TRUNK_BLOCKS

    def build(self) -> nn.Module:
        """The network with these weights, in eval mode."""
        model = build_model(
            self.model_name,
            self.in_channels,
            len(self.classes),
            self.width,
            self.dropout,
            self.width_multiplier,
            view=InputView(self.stats, self.input_size) if self.input_size else None,
            trunk_blocks=self.trunk_blocks,
        )
        model.load_state_dict(self.state_dict)
        return model.eval()


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    payload = asdict(checkpoint)
    payload["classes"] = list(checkpoint.classes)
    payload["stats"] = {"mean": list(checkpoint.stats.mean), "std": list(checkpoint.stats.std)}
    payload["state_dict"] = {k: v.detach().cpu() for k, v in checkpoint.state_dict.items()}
    if checkpoint.class_prior is not None:
        payload["class_prior"] = list(checkpoint.class_prior)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    # weights_only: a checkpoint is data, never code to execute.
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["classes"] = tuple(payload["classes"])
    stats = payload["stats"]
    payload["stats"] = ChannelStats(mean=tuple(stats["mean"]), std=tuple(stats["std"]))
    if payload.get("class_prior") is not None:
        payload["class_prior"] = tuple(payload["class_prior"])
    return Checkpoint(**payload)


def resolve_checkpoint(ref: str | Path) -> Path:
    """A checkpoint by local path, or by MLflow URI (``runs:/<id>/model``, ``models:/name@alias``,
    ``mlflow-artifacts:/...``): downloaded, then the one ``.pt`` file in it."""
    path = Path(ref)
    if path.is_file():
        return path
    if ":/" not in str(ref):
        raise FileNotFoundError(f"{ref}: no such checkpoint file and not an MLflow URI")
    import mlflow.artifacts  # slow to import; only URIs need it

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(ref)))
    if local.is_file():
        return local
    found = sorted(local.rglob("*.pt"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{ref} holds {len(found)} .pt files ({', '.join(p.name for p in found) or 'none'}); "
            "point the URI at exactly one checkpoint"
        )
    return found[0]
