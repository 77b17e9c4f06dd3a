"""Sharing a model: the saved folder layout that the teacher (model.EarVAE) and the students (student.Student) share,
and huggingface_hub's PyTorchModelHubMixin with that layout.

    SharedOnHub                 the mixin: save_pretrained(dir) writes config.json + model.safetensors + README.md,
                                from_pretrained(dir or hub id) rebuilds the model (hub_folder), push_to_hub uploads
                                what save_pretrained writes; each model class says what its files hold
    read_folder_config / read_folder_weights / write_pretrained   the folder's files, read or written
    config_problem / load_state what is wrong with a saved config; a strict load of saved weights
    card_metadata / metrics_table   the parts of a model card that both models' cards share

Every problem with a file is a CheckpointError naming it. Nothing here ever unpickles Python objects.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from errors import CheckpointError
from files import write_outputs

EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_CARD = "config.json", "model.safetensors", "README.md"


class SharedOnHub(PyTorchModelHubMixin):
    """huggingface_hub's PyTorchModelHubMixin whose save_pretrained / from_pretrained write and read this project's
    layout (config.json + model.safetensors + README.md, never a pickle; a hub id offline fails in one line).
    push_to_hub is the mixin's own. A model class defines `hub_files` and `from_folder`."""

    # -- what a model class defines

    def hub_files(self, **model_card_kwargs) -> tuple[dict, str]:
        """-> (config.json's object, README.md's text) of this model; model_card_kwargs: the card's figures."""
        raise NotImplementedError

    @classmethod
    def from_folder(cls, folder: Path, map_location: str | torch.device = "cpu") -> nn.Module:
        """A folder that save_pretrained wrote -> the model in eval mode on map_location; CheckpointError naming the
        file when it cannot be read or does not fit."""
        raise NotImplementedError

    # -- huggingface_hub's API

    def save_pretrained(self, save_directory: str | Path, *, config: dict | None = None,
                        repo_id: str | None = None, push_to_hub: bool = False,
                        model_card_kwargs: dict | None = None, **push_to_hub_kwargs) -> str | None:
        """ModelHubMixin.save_pretrained, with the mixin's signature: save_directory gets config.json,
        model.safetensors and README.md (the model card), written together (write_pretrained), never a pickle. The
        mixin's own version deletes config.json before writing; this one leaves an earlier save whole when it fails.
        model_card_kwargs: the card's figures, for EarVAE {"metrics": dict, "step": int, "weights": "ema" | "model"},
        for a Student {"metrics": dict} (their hub_files). `config` must stay None: the model's own config is what
        config.json holds. push_to_hub=True then uploads the same files to repo_id (default: the folder's name)
        through the mixin's push_to_hub -> its commit URL; otherwise None."""
        if config is not None:
            raise ValueError("save_pretrained: config must be None (config.json holds the model's own config)")
        write_pretrained(self, save_directory, *self.hub_files(**(model_card_kwargs or {})))
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, model_card_kwargs=model_card_kwargs,
                                    **push_to_hub_kwargs)
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, force_download: bool = False,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, revision: str | None = None,
                        map_location: str | torch.device = "cpu") -> nn.Module:
        """ModelHubMixin.from_pretrained, with the mixin's signature (and map_location): a save_pretrained /
        export_model folder, or a hub id whose config.json and model.safetensors are fetched (hub_folder) -> the
        model in eval mode on map_location (the class's from_folder: JSON and safetensors only). Raises
        CheckpointError naming the folder's file or the hub id (offline: one line saying what was tried and how to
        fix it)."""
        folder = hub_folder(pretrained_model_name_or_path, force_download=force_download, token=token,
                            cache_dir=cache_dir, local_files_only=local_files_only, revision=revision)
        return cls.from_folder(folder, map_location)


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


def checkpoint_kind(ckpt: dict) -> tuple[str, str]:
    """Which command wrote a checkpoint dict, for messages -> (its kind in words, the command): a landmark model's
    (landmarker.py), a student's (distill.py) or a teacher's (train.py)."""
    if "landmark_config" in ckpt:
        return "a landmark model's", "landmarker.py"
    if "student_config" in ckpt:
        return "a student's", "distill.py"
    return "a teacher's", "train.py"


def config_problem(d: object, config_class: type) -> str | None:
    """What is wrong with a JSON model config of the dataclass config_class (model.VAEConfig, student.StudentConfig;
    missing fields take its defaults, as for a checkpoint), or None. Types follow the defaults: tuples are JSON lists
    of integers, encoder_config a dict or null; sizes and indices are at least the class's MINIMA (latent_dim -5,
    decoder_channels [] are refused here, before any tensor is built)."""
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
        elif name == "names":  # LandmarkConfig's landmark names
            ok = isinstance(value, (list, tuple)) and all(type(v) is str for v in value)
        elif isinstance(default, tuple):
            ok = isinstance(value, (list, tuple)) and all(type(v) is int for v in value)  # JSON list, or a .pt's tuple
        else:
            ok = type(value) is type(default)  # exact: a bool is not an int here
        if not ok:
            like = "an integer or null" if name == "identity_dims" else f"a value like {default!r}"
            return f"field {name}={value!r}: expected {like}"
        low = getattr(config_class, "MINIMA", {}).get(name)  # the smallest size or index that can be built
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if low is not None and (any(v is not None and v < low for v in values) or not values):
            what = f"integers >= {low}, at least one" if isinstance(value, (list, tuple)) else f"an integer >= {low}"
            return f"field {name}={value!r}: expected {what}"
    return None


def load_state(model: nn.Module, state: dict, path: str | Path) -> None:
    """Strict load: a checkpoint of another configuration fails loudly instead of loading half."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        raise CheckpointError(f"{path}: weights do not fit the model ({'; '.join(lines[1:3])[:300]})") from e


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


def card_metadata(cls: type) -> str:
    """A model card's YAML front matter (the hub reads library_name and tags from it): the metadata that the class
    declared to huggingface_hub's ModelHubMixin (`class EarVAE(nn.Module, SharedOnHub, tags=...)`)."""
    return f"---\n{cls._hub_mixin_info.model_card_data.to_yaml()}\n---\n"


def metrics_table(metrics: dict | None) -> list[str]:
    """A model card's "## Metrics" section as lines (none without metrics): floats to 4 significant digits."""
    if not metrics:
        return []
    return ["## Metrics", "", "| metric | value |", "|---|---|",
            *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()], ""]


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
