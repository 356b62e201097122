"""Export a run's backbone as a timm state dict in safetensors format."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import timm
import torch
from lightly.transforms.utils import IMAGENET_NORMALIZE
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer

from accelvit.arch import EXTRA_PARAMETERS
from accelvit.backbone import build_backbone, timm_kwargs
from accelvit.checkpoint import (
    TMP_PREFIX,
    atomic_path,
    check_output,
    latest_checkpoint,
    run_recipe,
    verify_checkpoint,
)
from accelvit.config import Config, ConfigError, ModelConfig, from_dict
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


def preprocessing(image_size: int) -> dict:
    """What an exported backbone expects of its input: accelvit evaluates on images resized (no crop)
    to the model's side, normalised with ImageNet's mean and std (evaluate.eval_transform)."""
    return {
        "input_size": [3, image_size, image_size],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "mean": list(IMAGENET_NORMALIZE["mean"]),
        "std": list(IMAGENET_NORMALIZE["std"]),
    }


def export_backbone(
    run_dir: Path, out: Path, checkpoint: str | None = None, encoder: str | None = None
) -> Path:
    """Write the backbone weights with timm's key names to `out`: a .safetensors file, or any other
    name a folder in timm's own format (`timm.create_model("local-dir:OUT", pretrained=True)`), for
    a plain ViT.

    `encoder`: student or teacher (null: `eval.encoder`, else the objective's reference choice).

    Load them with `timm.create_model(arch, **kwargs)` + `load_state_dict`; `arch` and `kwargs`
    are stored in the file's metadata. Architecture options (value residual, preconditioning, a
    convolutional stem) add parameters timm's plain ViT does not have: the metadata lists them
    (`extra_parameters`) with the whole model section (`accelvit_model`), and
    `accelvit.backbone.build_backbone` of that section loads the file strictly.
    """
    cfg = run_recipe(run_dir, check_paths=False)
    folder = out.suffix != ".safetensors"
    if folder and out.exists() and not out.is_dir():
        raise ConfigError(
            f"-o {out}: exists and is not a folder (a name without .safetensors asks for a timm folder)"
        )
    if folder and out.exists() and any(out.iterdir()):
        raise ConfigError(f"-o {out}: exists and is not an empty folder (a timm folder is written anew)")
    check_output(out.with_name(TMP_PREFIX + out.name) if folder else out)  # a folder is written there first
    path = resolve_checkpoint(run_dir, checkpoint)
    attribute = chosen_encoder(cfg, encoder)
    backbone = backbone_weights(path, attribute)
    kwargs = timm_kwargs(cfg.model)
    extra = sorted(k for k in backbone if is_extra(k))
    if folder:
        if extra:
            raise ConfigError(
                f"-o {out}: timm's folder format holds plain ViTs; this backbone has parameters timm's "
                f"{cfg.model.arch} lacks (e.g. {extra[0]}): export to a .safetensors file instead"
            )
        return _export_timm_folder(cfg, kwargs, backbone, out)
    metadata = {
        "arch": cfg.model.arch,
        "encoder": "student" if attribute == "backbone" else "teacher",
        "timm_kwargs": json.dumps(kwargs),
        "checkpoint": path.name,
        "extra_parameters": json.dumps(extra),
        "accelvit_model": json.dumps(dataclasses.asdict(cfg.model)),
        "preprocessing": json.dumps(preprocessing(cfg.model.image_size)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(backbone, str(tmp), metadata=metadata)
    return out


def _export_timm_folder(cfg: Config, kwargs: dict, backbone: dict, out: Path) -> Path:
    """config.json (architecture, arguments, preprocessing) and model.safetensors, via timm."""
    vit = timm.create_model(cfg.model.arch, **kwargs)
    vit.load_state_dict(backbone, strict=True)
    args = {k: v for k, v in kwargs.items() if k != "pretrained"}
    with atomic_path(out) as tmp:  # an empty folder at `out` (checked before) is replaced
        data = preprocessing(cfg.model.image_size)
        save_for_hf(vit, str(tmp), model_args=args, safe_serialization=True, data_config=data)
    return out


def load_export(path: Path) -> tuple[VisionTransformer, ModelConfig]:
    """The backbone of an `accelvit export` .safetensors file, any architecture option or stem
    included, in eval mode, and its model section (`preprocessing(model.image_size)` is its input)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "accelvit_model" not in metadata:
        raise ConfigError(f"'{path}' was not written by accelvit export (no accelvit_model metadata)")
    model = from_dict(ModelConfig, json.loads(metadata["accelvit_model"]), "model")
    vit = build_backbone(model)
    vit.load_state_dict(load_file(str(path)))
    return vit.eval(), model
