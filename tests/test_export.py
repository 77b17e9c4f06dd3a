"""Tests for checkpoints.export_model / model.read_export / checkpoints.load_model(DIR): the exported directory
(config.json, model.safetensors, README.md) rebuilds the same model with no pickle, EMA weights are the ones exported,
and every broken or hostile directory is refused with a CheckpointError naming the file."""
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from checkpoints import export_model, load_model, read_checkpoint  # noqa: E402
from conftest import Hostile, tiny_train_args  # noqa: E402
from errors import CheckpointError  # noqa: E402
from model import EXPORT_FORMAT, build_model, tiny_config  # noqa: E402


def batch(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def random_tiny(encoder: str = "sam", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_config(encoder, latent_dim=64, **overrides)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A random tiny SAM model and its export."""
    model = random_tiny()
    out = tmp_path_factory.mktemp("export") / "teacher"
    export_model(model, out, metrics={"psnr": 31.23456, "n_images": 16})
    return model, out


def copy_export(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("encoder", ["sam", "dinov2"])
def test_export_reloads_identical_weights_and_outputs(encoder, tmp_path):
    model = random_tiny(encoder)
    written = export_model(model, tmp_path / "out")
    assert sorted(p.name for p in written) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded, cfg = load_model(tmp_path / "out")
    assert cfg == model.cfg and not loaded.training
    assert_same_state(loaded.state_dict(), model.state_dict())
    with torch.no_grad():
        expected, got = model(batch()), loaded(batch())
    for k in ("recon", "mu", "logvar"):
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)


@pytest.mark.parametrize("identity_dims,embed_dim", [(0, 0), (8, 0), (8, 16)])  # all of mu, its first 8, a head
def test_embedding_of_an_exported_model_equals_that_of_the_checkpoint(identity_dims, embed_dim, tmp_path):
    model = random_tiny(identity_dims=identity_dims, embed_dim=embed_dim)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.cfg), "step": 7}, tmp_path / "best.pt")
    export_model(tmp_path / "best.pt", tmp_path / "out")
    from_ckpt, _ = load_model(tmp_path / "best.pt")
    from_export, cfg = load_model(tmp_path / "out")
    assert (cfg.identity_dims, cfg.embed_dim) == (identity_dims, embed_dim)
    expected, got = from_ckpt.embed(batch()), from_export.embed(batch())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.shape == (2, embed_dim or identity_dims or 64) and cfg.embedding_dim == got.shape[1]
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2))  # unit L2 norm
    read = from_ckpt.encode(batch())[0][:, :identity_dims or 64]  # the entries of mu the embedding reads
    if embed_dim:
        read = from_ckpt.embed_head(read)
    torch.testing.assert_close(got, torch.nn.functional.normalize(read, dim=1))


def test_a_dense_head_is_exported_and_reloaded_with_the_model(tmp_path):
    """--dense-dim's projection head is part of the model: an export and a checkpoint written before the field
    existed (no dense_dim: no head) both reload with the keys they hold."""
    model = random_tiny(dense_dim=8)
    export_model(model, tmp_path / "out")
    loaded, cfg = load_model(tmp_path / "out")
    assert cfg.dense_dim == 8 and any(k.startswith("dense_head.") for k in loaded.state_dict())
    assert_same_state(loaded.state_dict(), model.state_dict())
    old = random_tiny()
    config = asdict(old.cfg)
    del config["dense_dim"]
    torch.save({"model": old.state_dict(), "model_config": config, "step": 7}, tmp_path / "old.pt")
    loaded, cfg = load_model(tmp_path / "old.pt")
    assert cfg.dense_dim == 0 and loaded.dense_head is None


def test_a_checkpoint_saved_before_identity_dims_embeds_all_of_mu(tmp_path):
    """Configs written before the field existed have no identity_dims: their embedding was all of mu, and stays so
    (the field's default, an eighth of the latent, would silently change what such a model's embed returns)."""
    model = random_tiny(identity_dims=0)
    config = asdict(model.cfg)
    del config["identity_dims"]
    torch.save({"model": model.state_dict(), "model_config": config, "step": 7}, tmp_path / "old.pt")
    loaded, cfg = load_model(tmp_path / "old.pt")
    assert cfg.identity_dims == 0 and random_tiny().cfg.identity_dims == 64 // 8
    torch.testing.assert_close(loaded.embed(batch()), torch.nn.functional.normalize(loaded.encode(batch())[0], dim=1))


def test_config_json_holds_the_full_model_config_and_format_tag(exported):
    model, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == EXPORT_FORMAT and config["step"] is None and config["weights"] == "model"
    assert config["model_config"] == json.loads(json.dumps(asdict(model.cfg)))
    assert config["model_config"]["encoder_config"]["hidden_size"] == 64  # rebuilds offline


def test_model_card_names_config_metrics_and_how_to_load(exported):
    _, out = exported
    card = (out / "README.md").read_text()
    assert "| latent_dim | `64` |" in card
    assert "| psnr | 31.23 |" in card and "| n_images | 16 |" in card
    assert "load_model(" in card and "an unknown step" in card


def test_export_of_a_checkpoint_writes_its_ema_weights_and_step(tmp_path):
    model, ema = random_tiny(seed=0), random_tiny(seed=1)
    ckpt = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "model_config": asdict(model.cfg),
                "step": 123, "run_config": {"data_dir": "/somewhere"}}, ckpt)
    export_model(ckpt, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["step"] == 123 and config["weights"] == "ema"
    loaded, _ = load_model(tmp_path / "out")
    assert_same_state(loaded.state_dict(), ema.state_dict())
    assert "step 123" in (tmp_path / "out" / "README.md").read_text()
    # an export of the export keeps both facts
    export_model(tmp_path / "out", tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == config


def test_read_checkpoint_of_a_directory_gives_checkpoint_like_info(exported, tmp_path):
    model, out = exported
    ckpt = read_checkpoint(out)
    assert ckpt["step"] is None and ckpt["weights"] == "model" and "run_config" not in ckpt
    assert_same_state(ckpt["model"], model.state_dict())
    loaded, _ = load_model(out, "cpu", ckpt)  # the eval.py pattern: read once, then build
    assert_same_state(loaded.state_dict(), model.state_dict())


def test_failed_export_leaves_the_previous_export_intact(exported, tmp_path, monkeypatch):
    model, out = exported
    target = copy_export(out, tmp_path / "target")
    before = {f.name: f.read_bytes() for f in target.iterdir()}

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("model.model_card", broken_card)  # the last of the three files fails
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(random_tiny(seed=5), target)
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before


def test_export_rejects_what_is_not_a_model_or_path(tmp_path):
    with pytest.raises(TypeError, match="expected an EarVAE or a checkpoint path"):
        export_model({"model": {}}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_resume_from_an_export_is_refused(exported, synth_dir, tmp_path):
    _, out = exported
    with pytest.raises(CheckpointError, match="cannot resume"):
        train.main(tiny_train_args(synth_dir, tmp_path, "--resume", str(out)))


# ---------------------------------------------------------------------------------------------- broken directories

@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_directory_missing_a_file_is_refused_naming_it(exported, tmp_path, missing):
    d = copy_export(exported[1], tmp_path / "d")
    (d / missing).unlink()
    with pytest.raises(CheckpointError, match=f"{d / missing}: missing"):
        load_model(d)


def edit_config(d: Path, edit) -> None:
    config = json.loads((d / "config.json").read_text())
    edit(config)
    (d / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case, edit, match", [
    ("not json", None, "not a readable JSON file"),
    ("format", lambda c: c.update(format="something-else/2"), "format 'something-else/2'"),
    ("unknown field", lambda c: c["model_config"].update(n_layers=3), r"unknown fields \['n_layers'\]"),
    ("wrong type", lambda c: c["model_config"].update(latent_dim="64"), "field latent_dim='64'"),
    ("bool for int", lambda c: c["model_config"].update(head_pool=True), "field head_pool=True"),
    ("tuple field", lambda c: c["model_config"].update(feature_blocks=[1, "3"]), "field feature_blocks"),
    ("identity_dims", lambda c: c["model_config"].update(identity_dims="x"),
     "field identity_dims='x': expected an integer or null"),
    ("step", lambda c: c.update(step="12"), "step '12'"),
    ("unbuildable", lambda c: c["model_config"].update(encoder="vit"), "cannot be built.*'vit'"),
])
def test_bad_config_is_refused_naming_config_json(exported, tmp_path, case, edit, match):
    d = copy_export(exported[1], tmp_path / "d")
    if edit is None:
        (d / "config.json").write_text("{\"format\": ")
    else:
        edit_config(d, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(d)
    assert str(info.value).startswith(str(d / "config.json"))


def test_weights_of_another_configuration_are_refused_naming_the_weights_file(exported, tmp_path):
    d = copy_export(exported[1], tmp_path / "d")
    edit_config(d, lambda c: c["model_config"].update(latent_dim=32))  # the weights are for 64
    with pytest.raises(CheckpointError, match="model.safetensors: weights do not fit the model"):
        load_model(d)


def test_garbage_weights_file_is_refused_naming_it(exported, tmp_path):
    d = copy_export(exported[1], tmp_path / "d")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(d)


# ---------------------------------------------------------------------------------------------- no pickle

def test_hostile_pickle_in_an_export_directory_never_runs(exported, tmp_path):
    marker = tmp_path / "MARKER"
    # a pickle in place of the weights, and a pickle in place of the config: both refused
    for name in ("model.safetensors", "config.json"):
        d = copy_export(exported[1], tmp_path / name.replace(".", "_"))
        torch.save({"model": Hostile(marker)}, d / name)
        with pytest.raises(CheckpointError, match=name):
            load_model(d)
    # a pickle beside the real files (the old transformers layout) is never opened
    d = copy_export(exported[1], tmp_path / "beside")
    torch.save(Hostile(marker), d / "pytorch_model.bin")
    load_model(d)
    export_model(d, tmp_path / "re-exported")
    assert not marker.exists()


@pytest.mark.parametrize("field, value, expected", [
    ("latent_dim", -5, "an integer >= 1"), ("head_pool", 0, "an integer >= 1"), ("freeze_blocks", -1, "an integer >= 0"),
    ("decoder_channels", [], "integers >= 1, at least one"), ("feature_blocks", [1, -3], "integers >= 0, at least one")])
def test_every_size_of_a_saved_config_is_checked_before_any_tensor_is_built(tiny_run, tmp_path, field, value, expected):
    """A checkpoint's model_config and an export's config.json with a size out of range: one CheckpointError naming
    the file and the field, for the teacher and (its sizes) the student, instead of an error from deep in torch."""
    ckpt = torch.load(tiny_run.best, weights_only=True)
    ckpt["model_config"][field] = value
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=rf"bad\.pt: .*field {field}=.*: expected {re.escape(expected)}"):
        load_model(tmp_path / "bad.pt")
    export_model(tiny_run.best, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    config["model_config"][field] = value
    (tmp_path / "export" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"config\.json: .*field {field}=.*: expected {re.escape(expected)}"):
        load_model(tmp_path / "export")


def test_a_students_saved_sizes_are_checked_too(tmp_path):
    from student import Student, StudentConfig, load_student
    Student(StudentConfig(pretrained=False, embed_dim=8, latent_dim=16, head_dim=16, input_size=32)).save_pretrained(
        tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    config["student_config"]["head_dim"] = -1
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: student_config field head_dim=-1: expected an integer "
                                              r">= 1"):
        load_student(tmp_path / "s")
