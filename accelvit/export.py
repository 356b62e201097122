"""Export a run's backbone as a timm state dict in safetensors format."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from accelvit.arch import EXTRA_PARAMETERS
from accelvit.backbone import timm_kwargs
from accelvit.checkpoint import RECIPE, check_output, latest_checkpoint, verify_checkpoint
from accelvit.config import Config, ConfigError, load_config
from accelvit.objectives import encoder_name

BACKBONE_PREFIX = "backbone."
STEM_PREFIX = "patch_embed.backbone."  # timm's HybridEmbed keeps the convolutional stem there


def resolve_checkpoint(run_dir: Path, name: str | None = None) -> Path:
    """`run_dir/checkpoints/NAME` (e.g. step_500), or the newest complete checkpoint."""
    if name is None:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise ConfigError(f"'{run_dir}' has no complete checkpoint")
    else:
        path = run_dir / "checkpoints" / name
    verify_checkpoint(path)
    return path


def backbone_weights(checkpoint: Path, encoder: str = "backbone") -> dict[str, torch.Tensor]:
    """One encoder's part of a checkpoint's model weights (`encoder`: the model attribute, e.g.
    `teacher_backbone`), with timm's key names."""
    prefix = encoder + "."
    weights = load_file(str(checkpoint / "model.safetensors"))
    return {k.removeprefix(prefix): v.contiguous() for k, v in weights.items() if k.startswith(prefix)}


def chosen_encoder(cfg: Config, encoder: str | None) -> str:
    """The model attribute of the encoder to use: `encoder` (student or teacher) if given, else the
    recipe's `eval.encoder`, else the objective's reference choice."""
    name = encoder or cfg.eval.encoder
    try:
        return encoder_name(cfg.objective.name, name)
    except ValueError as exc:
        raise ConfigError(f"--encoder {name}: {exc}") from None


def is_extra(key: str) -> bool:
    """Whether a backbone state-dict key is one that timm's plain ViT of the arch lacks."""
    return key in EXTRA_PARAMETERS or key.startswith(STEM_PREFIX)


def export_backbone(
    run_dir: Path, out: Path, checkpoint: str | None = None, encoder: str | None = None
) -> Path:
    """Write the backbone weights with timm's key names to `out` (.safetensors).

    `encoder`: student or teacher (null: `eval.encoder`, else the objective's reference choice).

    Load them with `timm.create_model(arch, **kwargs)` + `load_state_dict`; `arch` and `kwargs`
    are stored in the file's metadata. Architecture options (value residual, preconditioning, a
    convolutional stem) add parameters timm's plain ViT does not have: the metadata lists them
    (`extra_parameters`) with the whole model section (`accelvit_model`), and
    `accelvit.backbone.build_backbone` of that section loads the file strictly.
    """
    if not (run_dir / RECIPE).is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory (no {RECIPE})")
    check_output(out)
    cfg = load_config(run_dir / RECIPE, check_paths=False)
    path = resolve_checkpoint(run_dir, checkpoint)
    attribute = chosen_encoder(cfg, encoder)
    backbone = backbone_weights(path, attribute)
    kwargs = timm_kwargs(cfg.model)
    metadata = {
        "arch": cfg.model.arch,
        "encoder": "student" if attribute == "backbone" else "teacher",
        "timm_kwargs": json.dumps(kwargs),
        "checkpoint": path.name,
        "extra_parameters": json.dumps(sorted(k for k in backbone if is_extra(k))),
        "accelvit_model": json.dumps(dataclasses.asdict(cfg.model)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".tmp-" + out.name)
    try:
        save_file(backbone, str(tmp), metadata=metadata)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)  # left only if the write failed
    return out
