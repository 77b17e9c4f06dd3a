"""Checkpoints (written by train.py) and exported models (written by export_model): reading them safely, rebuilding
the model, and writing an export for others to use.

    read_checkpoint(path)       a train.py .pt (torch.load weights_only) or an export directory (JSON + safetensors)
    load_model(path)            -> (EarVAE in eval mode, VAEConfig), from either, with no other input
    export_model(ckpt, dir)     config.json + model.safetensors + README.md model card, written together or not at all
    save_pretrained / from_pretrained   huggingface_hub's ModelHubMixin API of EarVAE and student.Student: the same
                                layout, a local folder or a hub id (hf_hub_download; a one-line error offline);
                                push_to_hub is the mixin's own (it uploads what save_pretrained writes)

Every problem with a file is a CheckpointError naming it. Nothing here ever unpickles Python objects.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
from huggingface_hub import hf_hub_download
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from files import torch_file_problem, write_outputs
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
    if problem := torch_file_problem(path):
        raise CheckpointError(f"{path}: {problem}")
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
    if not isinstance(ckpt, dict) or "model" not in ckpt or not ("model_config" in ckpt or "student_config" in ckpt):
        raise CheckpointError(f"{path}: not an ear-teacher checkpoint (expected keys 'model' and 'model_config', or "
                              f"'student_config' for a student)")
    return ckpt


def read_export(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """An export_model directory as a checkpoint-like dict, the keys load_model and eval's checkpoint_info read:
    {"model": state dict, "model_config": dict, "step": int | None, "weights": "ema" | "model"}. It has no
    "run_config" (an export does not name the training data). JSON and safetensors only: nothing is unpickled.
    A missing file, bad JSON, another format or a config that does not fit VAEConfig -> CheckpointError naming
    the file."""
    path = Path(path)
    config = read_folder_config(path, EXPORT_FORMAT, "model.export_model")
    config_path = path / EXPORT_CONFIG
    problem = config_problem(config.get("model_config"))
    if problem:
        raise CheckpointError(f"{config_path}: model_config {problem}")
    step = config.get("step")
    if not (step is None or type(step) is int) or config.get("weights") not in ("ema", "model"):
        raise CheckpointError(f"{config_path}: step {step!r} / weights {config.get('weights')!r}: expected an "
                              f"integer or null / 'ema' or 'model'")
    state = read_folder_weights(path, map_location)
    return {"model": state, "model_config": config["model_config"], "step": step, "weights": config["weights"]}


def read_folder_config(path: Path, fmt: str, writer: str) -> dict:
    """config.json of a saved folder (export_model / save_pretrained), whose "format" must be `fmt`; both of its
    files must be there. writer: what writes such folders, for the messages. -> the JSON object. A missing file,
    bad JSON or another format -> CheckpointError naming the file."""
    config_path, weights_path = path / EXPORT_CONFIG, path / EXPORT_WEIGHTS
    for f in (config_path, weights_path):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing: an exported model directory holds {EXPORT_CONFIG} and "
                                  f"{EXPORT_WEIGHTS} (written by {writer})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not a readable JSON file ({type(e).__name__}: {e})") from e
    if not isinstance(config, dict) or config.get("format") != fmt:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{config_path}: format {found!r}, expected {fmt!r} (written by {writer})")
    return config


def read_folder_weights(path: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """model.safetensors of a saved folder -> its state dict on map_location (safetensors: no pickle).
    Unreadable -> CheckpointError naming the file."""
    weights_path = path / EXPORT_WEIGHTS
    try:
        return load_file(weights_path, device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]})") from e


def config_problem(d: object, config_class: type = VAEConfig) -> str | None:
    """What is wrong with a JSON model config (missing fields take config_class's defaults, as for a checkpoint),
    or None. Types follow the defaults: tuples are JSON lists of integers, encoder_config a dict or null."""
    if not isinstance(d, dict):
        return f"is a {type(d).__name__}, expected an object"
    defaults = {f.name: f.default for f in fields(config_class)}
    unknown = sorted(set(d) - set(defaults))
    if unknown:
        return f"has unknown fields {unknown}"
    for name, value in d.items():
        default = defaults[name]
        if name == "encoder_config":
            ok = value is None or isinstance(value, dict)
        elif name == "identity_dims":
            ok = value is None or type(value) is int
        elif isinstance(default, tuple):
            ok = isinstance(value, list) and all(type(v) is int for v in value)
        else:
            ok = type(value) is type(default)  # exact: a bool is not an int here
        if not ok:
            like = "an integer or null" if name == "identity_dims" else f"a value like {default!r}"
            return f"field {name}={value!r}: expected {like}"
    return None


def config_from_checkpoint(ckpt: dict) -> VAEConfig:
    d = dict(ckpt["model_config"])
    for k in ("feature_blocks", "decoder_channels"):
        d[k] = tuple(d[k])
    d.setdefault("identity_dims", 0)  # saved before the field existed, when the embedding was all of mu
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
    if "student_config" in ckpt:
        raise CheckpointError(f"{path}: a student's checkpoint (train.py --teacher), not a teacher's: evaluate it with "
                              f"eval.py, load it with student.load_student")
    exported = Path(path).is_dir()
    try:
        model = build_model(config_from_checkpoint(ckpt))
    except (ValueError, TypeError) as e:  # ConfigError and what transformers' config classes raise
        where = Path(path) / EXPORT_CONFIG if exported else path
        raise CheckpointError(f"{where}: its model config cannot be built ({type(e).__name__}: {e})") from e
    load_state(model, ckpt.get("ema") or ckpt["model"], Path(path) / EXPORT_WEIGHTS if exported else path)
    return model.to(map_location).eval(), model.cfg


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 (hex) of a model's state dict: every tensor's name, dtype, shape and bytes in name order. Two models
    hash equal exactly when their weights are bit-identical, whatever file they were read from; train.py keeps a
    distillation run's teacher hash to refuse resuming against another teacher."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    return write_pretrained(model, out_dir, *teacher_files(model, metrics, step, source))


def teacher_files(model: EarVAE, metrics: dict | None = None, step: int | None = None,
                  weights: str = "model") -> tuple[dict, str]:
    """An EarVAE's config.json (format EXPORT_FORMAT) and README.md model card; step: training step or None,
    weights: "ema" or "model" (which of the checkpoint's weights the model holds)."""
    config = {"format": EXPORT_FORMAT, "model_config": asdict(model.cfg), "step": step, "weights": weights}
    return config, model_card(model, step, weights, metrics)


def write_pretrained(model: nn.Module, out_dir: str | Path, config: dict, card: str) -> list[Path]:
    """out_dir/config.json (`config`), out_dir/model.safetensors (the model's state dict, on the CPU) and
    out_dir/README.md (`card`), written together (files.write_outputs): a failure leaves out_dir as it was.
    -> the written paths."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    out = Path(out_dir)
    files = {out / EXPORT_CONFIG: lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()),
             out / EXPORT_WEIGHTS: lambda f: f.write(save(tensors, metadata={"format": "pt"})),
             out / EXPORT_CARD: lambda f: f.write(card.encode())}
    write_outputs(files)
    return list(files)


def embedding_source(cfg: VAEConfig) -> str:
    """What model.embed reads, in words for the model card."""
    src = f"the first {cfg.identity_dims} entries of mu" if cfg.identity_dims else "mu"
    return f"an MLP head over {src} to {cfg.embed_dim} dimensions" if cfg.embed_dim else (
        src if cfg.identity_dims else "mu itself")


def model_card(model: EarVAE, step: int | None, weights: str, metrics: dict | None) -> str:
    """README.md of an export: a few lines on what the model is, its config, metrics and how to load it."""
    cfg, enc = model.cfg, model.cfg.encoder_config or {}
    total, _ = count(model)
    backbone = {"sam": "SAM ViT", "dinov2": "DINOv2 ViT"}[cfg.encoder]
    start = f"initialised from `{cfg.weights}`" if cfg.pretrained else "trained from a random initialisation"
    what = "the exponential moving average (EMA) of the training weights" if weights == "ema" else "the training weights"
    lines = [
        card_metadata(type(model)), "# Ear-teacher VAE", "",
        f"A variational autoencoder for {cfg.image_size}x{cfg.image_size} RGB ear crops in [0, 1]: a {backbone} "
        f"encoder ({enc.get('num_hidden_layers', '?')} blocks of width {enc.get('hidden_size', '?')}, input "
        f"{cfg.input_size}x{cfg.input_size}, {start}), a VAE head to a {cfg.latent_dim}-d latent and a "
        f"convolutional decoder. The posterior mean `mu` is the ear embedding a student distils from; "
        f"`model.embed(x)` is the identity embedding (unit L2 norm, compared by cosine similarity: "
        f"{embedding_source(cfg)}); "
        f"`model.encoder.features(x)` returns the multi-scale pyramid (blocks {list(cfg.feature_blocks)}).", "",
        f"Weights: {what} at {f'step {step}' if step is not None else 'an unknown step'}; "
        f"{total / 1e6:.1f}M parameters.", "",
        "## Config", "", "| field | value |", "|---|---|",
        *[f"| {k} | `{v}` |" for k, v in asdict(cfg).items() if k != "encoder_config"],
        f"| encoder_config | see `{EXPORT_CONFIG}` |", "",
    ]
    lines += metrics_table(metrics)
    lines += ["## Load", "", "With this repository's `model.py` (JSON and safetensors only, nothing is unpickled):", "",
              "```python", "from model import EarVAE, load_model", "",
              "model = EarVAE.from_pretrained(\"path/to/this/directory\")  # or its hub id; eval mode, CPU",
              "model, cfg = load_model(\"path/to/this/directory\")  # the same, with its VAEConfig",
              "out = model(x)  # x: (B, 3, 128, 128) in [0, 1] -> recon (B, 3, 128, 128), mu, logvar, z (B, latent_dim)",
              "e = model.embed(x)  # (B, E) identity embedding, unit L2 norm: compare by cosine similarity",
              "```", "",
              f"Files: `{EXPORT_CONFIG}` (format `{EXPORT_FORMAT}`), `{EXPORT_WEIGHTS}`, `{EXPORT_CARD}`.", ""]
    return "\n".join(lines)


def card_metadata(cls: type) -> str:
    """A model card's YAML front matter (the hub reads library_name and tags from it): the metadata that the class
    declared to huggingface_hub's ModelHubMixin (`class EarVAE(nn.Module, PyTorchModelHubMixin, tags=...)`)."""
    return f"---\n{cls._hub_mixin_info.model_card_data.to_yaml()}\n---\n"


def metrics_table(metrics: dict | None) -> list[str]:
    """A model card's "## Metrics" section as lines (none without metrics): floats to 4 significant digits."""
    if not metrics:
        return []
    return ["## Metrics", "", "| metric | value |", "|---|---|",
            *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()], ""]


# -----------------------------------------------------------------------------
# sharing through huggingface_hub's ModelHubMixin (EarVAE and student.Student call these)

def save_pretrained(model: nn.Module, save_directory: str | Path, *, config: dict | None = None,
                    repo_id: str | None = None, push_to_hub: bool = False,
                    model_card_kwargs: dict | None = None, **push_to_hub_kwargs) -> str | None:
    """ModelHubMixin.save_pretrained for this project's models, with the mixin's signature: save_directory gets
    config.json, model.safetensors and README.md (the model card), written together (write_pretrained), never a
    pickle. The mixin's own version deletes config.json before writing; this one leaves an earlier save whole when
    it fails. model_card_kwargs: the card's figures, for EarVAE {"metrics": dict, "step": int, "weights": "ema" |
    "model"} (teacher_files), for a Student {"metrics": dict} (Student.hub_files). `config` must stay None: the
    model's own config is what config.json holds. push_to_hub=True then uploads the same files to repo_id (default:
    the folder's name) through the mixin's push_to_hub -> its commit URL; otherwise None."""
    if config is not None:
        raise ValueError("save_pretrained: config must be None (config.json holds the model's own config)")
    card_kwargs = model_card_kwargs or {}
    files = teacher_files(model, **card_kwargs) if isinstance(model, EarVAE) else model.hub_files(**card_kwargs)
    write_pretrained(model, save_directory, *files)
    if push_to_hub:
        return model.push_to_hub(repo_id or Path(save_directory).name, model_card_kwargs=model_card_kwargs,
                                 **push_to_hub_kwargs)
    return None


def from_pretrained(cls: type, pretrained_model_name_or_path: str | Path, *, force_download: bool = False,
                    token: str | bool | None = None, cache_dir: str | Path | None = None,
                    local_files_only: bool = False, revision: str | None = None,
                    map_location: str | torch.device = "cpu") -> nn.Module:
    """ModelHubMixin.from_pretrained for this project's models, with the mixin's signature: a save_pretrained /
    export_model folder, or a hub id whose config.json and model.safetensors are fetched (hub_folder) -> the model
    in eval mode on map_location. EarVAE loads through load_model (read_export: JSON and safetensors only); another
    class through its from_folder(folder, map_location). Raises CheckpointError naming the folder's file or the hub
    id (offline: one line saying what was tried and how to fix it)."""
    folder = hub_folder(pretrained_model_name_or_path, force_download=force_download, token=token,
                        cache_dir=cache_dir, local_files_only=local_files_only, revision=revision)
    if issubclass(cls, EarVAE):
        return load_model(folder, map_location)[0]
    return cls.from_folder(folder, map_location)


def hub_folder(name_or_path: str | Path, *, force_download: bool = False, token: str | bool | None = None,
               cache_dir: str | Path | None = None, local_files_only: bool = False,
               revision: str | None = None) -> Path:
    """A local folder as it is, or a Hugging Face hub id: its config.json and model.safetensors fetched with
    huggingface_hub.hf_hub_download (cached; HF_HUB_OFFLINE=1 reads the cache only) -> the folder holding them.
    Only these two files are ever fetched, so a pickle in the repository (pytorch_model.bin) is never downloaded.
    A file, a path that is not an id, or an id that cannot be fetched -> CheckpointError, one line naming what was
    tried and how to fix it."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.is_file():
        raise CheckpointError(f"{path}: a file; from_pretrained takes a save_pretrained folder ({EXPORT_CONFIG} + "
                              f"{EXPORT_WEIGHTS}) or a hub id (a train.py checkpoint loads with load_model)")
    name = str(name_or_path)
    try:
        fetched = [hf_hub_download(name, f, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                   token=token, local_files_only=local_files_only)
                   for f in (EXPORT_CONFIG, EXPORT_WEIGHTS)]
    except HFValidationError as e:
        raise CheckpointError(f"{name}: no such folder, and not a Hugging Face hub id either "
                              f"({' '.join(str(e).split())})") from e
    except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled) as e:
        how = ("offline (HF_HUB_OFFLINE=1), and not in the hub cache" if is_offline_mode() or local_files_only
               else "not fetched from the hub")
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(
            f"{name}: no such folder, and as a Hugging Face hub id its {EXPORT_CONFIG} + {EXPORT_WEIGHTS} were "
            f"{how} ({type(e).__name__}: {reason}). Fixes: (1) a local copy: pass the folder that save_pretrained "
            f"or export_model wrote; (2) while online, fetch it once: `hf download {name}` (then HF_HUB_OFFLINE=1 "
            f"reads the cache) or `hf download {name} --local-dir DIR`; (3) check the id and your access "
            f"(`hf auth login` for a private repository).") from e
    return Path(fetched[0]).parent  # both land in the same snapshot folder of the cache
