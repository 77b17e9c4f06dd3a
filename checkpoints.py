"""Checkpoints (written by train.py) and exported models (written by export_model): reading them safely, rebuilding
the model, and writing an export for others to use.

    read_checkpoint(path)       a train.py .pt (torch.load weights_only) or an export directory (JSON + safetensors)
    load_model(path)            -> (EarVAE in eval mode, VAEConfig), from either, with no other input
    export_model(ckpt, dir)     config.json + model.safetensors + README.md model card, written together or not at all

Every problem with a file is a CheckpointError naming it. Nothing here ever unpickles Python objects.
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from files import write_outputs
from model import EarVAE, VAEConfig, build_model, count


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe or does not fit its model. str(e) names the file."""



EXPORT_FORMAT = "ear-teacher-vae/1"  # config.json's "format": what wrote the directory, and which layout
EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_CARD = "config.json", "model.safetensors", "README.md"


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A train.py checkpoint file: torch.load with weights_only=True (a pickle in the file cannot run code), never
    retried without it. A directory is read as an export_model directory (read_export: no pickle at all).
    Any problem -> CheckpointError naming the file."""
    path = Path(path)
    if path.is_dir():
        return read_export(path, map_location)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler met a Python object it will not build
        what = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        detail = f"it asks to run {what.group(1)}" if what else "it holds Python objects, not only tensors"
        raise CheckpointError(f"{path}: refused: {detail} (a pickle can run code); only train.py checkpoints "
                              f"load") from e
    except Exception as e:  # anything else the parser raises on a damaged file (EOFError, IndexError, ...)
        reason = " ".join(str(e).split())[:160] or "no detail"
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: {reason})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path}: not an ear-teacher checkpoint (expected keys 'model' and 'model_config')")
    return ckpt


def read_export(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """An export_model directory as a checkpoint-like dict, the keys load_model and eval's checkpoint_info read:
    {"model": state dict, "model_config": dict, "step": int | None, "weights": "ema" | "model"}. It has no
    "run_config" (an export does not name the training data). JSON and safetensors only: nothing is unpickled.
    A missing file, bad JSON, another format or a config that does not fit VAEConfig -> CheckpointError naming
    the file."""
    path = Path(path)
    config_path, weights_path = path / EXPORT_CONFIG, path / EXPORT_WEIGHTS
    for f in (config_path, weights_path):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing: an exported model directory holds {EXPORT_CONFIG} and "
                                  f"{EXPORT_WEIGHTS} (written by model.export_model)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not a readable JSON file ({type(e).__name__}: {e})") from e
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{config_path}: format {found!r}, expected {EXPORT_FORMAT!r} (written by "
                              f"model.export_model)")
    problem = _model_config_problem(config.get("model_config"))
    if problem:
        raise CheckpointError(f"{config_path}: model_config {problem}")
    step = config.get("step")
    if not (step is None or type(step) is int) or config.get("weights") not in ("ema", "model"):
        raise CheckpointError(f"{config_path}: step {step!r} / weights {config.get('weights')!r}: expected an "
                              f"integer or null / 'ema' or 'model'")
    try:
        state = load_file(weights_path, device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]})") from e
    return {"model": state, "model_config": config["model_config"], "step": step, "weights": config["weights"]}


def _model_config_problem(d: object) -> str | None:
    """What is wrong with a JSON model config (missing fields take VAEConfig's defaults, as for a checkpoint),
    or None. Types follow the defaults: tuples are JSON lists of integers, encoder_config a dict or null."""
    if not isinstance(d, dict):
        return f"is a {type(d).__name__}, expected an object"
    defaults = {f.name: f.default for f in fields(VAEConfig)}
    unknown = sorted(set(d) - set(defaults))
    if unknown:
        return f"has unknown fields {unknown}"
    for name, value in d.items():
        default = defaults[name]
        if name == "encoder_config":
            ok = value is None or isinstance(value, dict)
        elif isinstance(default, tuple):
            ok = isinstance(value, list) and all(type(v) is int for v in value)
        else:
            ok = type(value) is type(default)  # exact: a bool is not an int here
        if not ok:
            return f"field {name}={value!r}: expected a value like {default!r}"
    return None


def config_from_checkpoint(ckpt: dict) -> VAEConfig:
    d = dict(ckpt["model_config"])
    for k in ("feature_blocks", "decoder_channels"):
        d[k] = tuple(d[k])
    return replace(VAEConfig(**d), pretrained=False)  # the weights come from the checkpoint, not the hub


def load_state(model: nn.Module, state: dict, path: str | Path) -> None:
    """Strict load: a checkpoint of another configuration fails loudly instead of loading half."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        raise CheckpointError(f"{path}: weights do not fit the model ({'; '.join(lines[1:3])[:300]})") from e


def load_model(path: str | Path, map_location: str | torch.device = "cpu",
               ckpt: dict | None = None) -> tuple[EarVAE, VAEConfig]:
    """Rebuild a trained model from a train.py checkpoint alone (config inside; EMA weights when the run kept
    them), or from an export_model directory (its weights, no pickle). `ckpt`: read_checkpoint(path)'s result
    when the caller has read it already, so it is not read twice."""
    if ckpt is None:
        ckpt = read_checkpoint(path, map_location)
    exported = Path(path).is_dir()
    try:
        model = build_model(config_from_checkpoint(ckpt))
    except (ValueError, TypeError) as e:  # ConfigError and what transformers' config classes raise
        where = Path(path) / EXPORT_CONFIG if exported else path
        raise CheckpointError(f"{where}: its model config cannot be built ({type(e).__name__}: {e})") from e
    load_state(model, ckpt.get("ema") or ckpt["model"], Path(path) / EXPORT_WEIGHTS if exported else path)
    return model.to(map_location).eval(), model.cfg


def export_model(model_or_ckpt: EarVAE | str | Path, out_dir: str | Path,
                 metrics: dict[str, float | int | str] | None = None) -> list[Path]:
    """Write a trained model for others to use, in the Hugging Face layout (no pickle):

        out_dir/config.json        {"format": EXPORT_FORMAT, "model_config": VAEConfig (encoder_config included),
                                    "step": training step or null, "weights": "ema" or "model"}
        out_dir/model.safetensors  the weights to use: the EMA weights when the checkpoint has them
        out_dir/README.md          a short model card: what it is, the config, `metrics` when given, how to load

    model_or_ckpt: a model (its current weights; step unknown), or the path of a train.py checkpoint or of another
    export. The three files are written together (files.write_outputs): a failure leaves out_dir as it was.
    load_model(out_dir) rebuilds the model. -> the written paths."""
    step, source = None, "model"
    if isinstance(model_or_ckpt, EarVAE):
        model = model_or_ckpt
    elif isinstance(model_or_ckpt, (str, Path)):
        ckpt = read_checkpoint(model_or_ckpt)
        step, source = ckpt.get("step"), ckpt.get("weights") or ("ema" if ckpt.get("ema") else "model")
        model, _ = load_model(model_or_ckpt, "cpu", ckpt)  # strict: only weights that fit their config leave
        del ckpt
    else:
        raise TypeError(f"export_model: got a {type(model_or_ckpt).__name__}, expected an EarVAE or a checkpoint path")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = {"format": EXPORT_FORMAT, "model_config": asdict(model.cfg), "step": step, "weights": source}
    out = Path(out_dir)
    files = {out / EXPORT_CONFIG: lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()),
             out / EXPORT_WEIGHTS: lambda f: f.write(save(tensors, metadata={"format": "pt"})),
             out / EXPORT_CARD: lambda f: f.write(model_card(model, step, source, metrics).encode())}
    write_outputs(files)
    return list(files)


def model_card(model: EarVAE, step: int | None, weights: str, metrics: dict | None) -> str:
    """README.md of an export: a few lines on what the model is, its config, metrics and how to load it."""
    cfg, enc = model.cfg, model.cfg.encoder_config or {}
    total, _ = count(model)
    backbone = {"sam": "SAM ViT", "dinov2": "DINOv2 ViT"}[cfg.encoder]
    start = f"initialised from `{cfg.weights}`" if cfg.pretrained else "trained from a random initialisation"
    what = "the exponential moving average (EMA) of the training weights" if weights == "ema" else "the training weights"
    lines = [
        "# Ear-teacher VAE", "",
        f"A variational autoencoder for {cfg.image_size}x{cfg.image_size} RGB ear crops in [0, 1]: a {backbone} "
        f"encoder ({enc.get('num_hidden_layers', '?')} blocks of width {enc.get('hidden_size', '?')}, input "
        f"{cfg.input_size}x{cfg.input_size}, {start}), a VAE head to a {cfg.latent_dim}-d latent and a "
        f"convolutional decoder. The posterior mean `mu` is the ear embedding a student distils from; "
        f"`model.embed(x)` is the identity embedding (unit L2 norm, compared by cosine similarity: "
        f"{'an MLP head over mu to ' + str(cfg.embed_dim) + ' dimensions' if cfg.embed_dim else 'mu itself'}); "
        f"`model.encoder.features(x)` returns the multi-scale pyramid (blocks {list(cfg.feature_blocks)}).", "",
        f"Weights: {what} at {f'step {step}' if step is not None else 'an unknown step'}; "
        f"{total / 1e6:.1f}M parameters.", "",
        "## Config", "", "| field | value |", "|---|---|",
        *[f"| {k} | `{v}` |" for k, v in asdict(cfg).items() if k != "encoder_config"],
        f"| encoder_config | see `{EXPORT_CONFIG}` |", "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()],
                  ""]
    lines += ["## Load", "", "With this repository's `model.py` (JSON and safetensors only, nothing is unpickled):", "",
              "```python", "from model import load_model", "",
              "model, cfg = load_model(\"path/to/this/directory\")  # eval mode, CPU",
              "out = model(x)  # x: (B, 3, 128, 128) in [0, 1] -> recon (B, 3, 128, 128), mu, logvar, z (B, latent_dim)",
              "e = model.embed(x)  # (B, E) identity embedding, unit L2 norm: compare by cosine similarity",
              "```", "",
              f"Files: `{EXPORT_CONFIG}` (format `{EXPORT_FORMAT}`), `{EXPORT_WEIGHTS}`, `{EXPORT_CARD}`.", ""]
    return "\n".join(lines)
