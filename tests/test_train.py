"""train.py: artefacts of a short run, schedule, and the one-line errors a user can meet."""
import csv
import json
import math
import subprocess
import sys

import pytest
import torch

import data
import loop
import train
from errors import ConfigError, DataError
from inference import resolve_precision
from model import build_model, config_from_checkpoint, tiny_config
from conftest import ROOT, tiny_train_args


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_short_run_writes_every_artefact(tiny_run):
    files = {p.name for p in tiny_run.ckpt_dir.iterdir()} | {p.name for p in tiny_run.log_dir.iterdir()}
    assert {"last.pt", "best.pt", "metrics.csv", "config.json", "loss_curve.png"} <= files
    assert any(f.startswith("recon_step") and f.endswith(".png") for f in files)  # one grid per epoch
    assert any(f.startswith("events.out.tfevents") for f in files)  # TensorBoard
    assert not any(f.endswith(".tmp") for f in files)
    rows = list(csv.DictReader(open(tiny_run.log_dir / "metrics.csv")))
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert [int(r["step"]) for r in train_rows] == list(range(1, 17))  # 2 epochs x 64 / 8, logged every step
    assert [int(r["step"]) for r in val_rows] == [8, 16]  # validation after each epoch
    run = torch.load(tiny_run.last, weights_only=True)["run_config"]
    weights = {"pixel": 1.0, "kl": run["kl_weight"], "ssim": run["ssim_weight"], "edge": run["edge_weight"],
               "contrastive": run["contrastive_weight"]}  # perceptual 0: not computed, not logged
    for r in train_rows:  # one process, one micro-step: the logged loss is the weighted sum of the logged terms
        assert r["perceptual"] == "" and float(r["lr"]) > 0 and float(r["grad_norm"]) > 0
        assert float(r["loss"]) == pytest.approx(sum(w * float(r[k]) for k, w in weights.items()), rel=1e-5)
    assert json.load(open(tiny_run.log_dir / "config.json"))["model"]["encoder"] == "sam"


def test_logged_validation_psnr_and_ssim_match_scikit_image_on_the_saved_model(tiny_run):
    import numpy as np
    import skimage.metrics
    from checkpoints import load_model
    val = [r for r in csv.DictReader(open(tiny_run.log_dir / "metrics.csv")) if r["split"] == "val"][-1]
    model, _ = load_model(tiny_run.last)  # eval mode; saved right after this validation (step 16)
    ds = data.EarDataset(tiny_run.data_dir / "val_teacher.npy")
    x = data.to_float(torch.stack([ds[i][0] for i in range(len(ds))]))  # (16, 3, 128, 128)
    with torch.no_grad():
        recon = model(x)["recon"].float()
    a, b = (t.permute(0, 2, 3, 1).double().numpy() for t in (x, recon))  # (16, 128, 128, 3)
    sk_psnr = np.mean([skimage.metrics.peak_signal_noise_ratio(u, v, data_range=1) for u, v in zip(a, b)])
    sk_ssim = np.mean([skimage.metrics.structural_similarity(u, v, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                                             use_sample_covariance=False, data_range=1)
                       for u, v in zip(a, b)])
    assert float(val["psnr"]) == pytest.approx(sk_psnr, abs=1e-3)
    assert float(val["ssim_metric"]) == pytest.approx(sk_ssim, abs=1e-4)


def test_checkpoint_holds_everything_to_resume_and_loads_weights_only(tiny_run):
    last = torch.load(tiny_run.last, weights_only=True)
    assert {"model", "model_config", "run_config", "optimizer", "scheduler", "scaler", "step", "epoch",
            "epoch_pos", "best_psnr", "skipped"} <= set(last)
    assert last["step"] == 16 and last["epoch"] == 2 and last["epoch_pos"] == 0
    best = torch.load(tiny_run.best, weights_only=True)
    assert "optimizer" not in best and best["best_psnr"] == last["best_psnr"]


def test_best_is_the_epoch_with_the_highest_validation_psnr(tiny_run):
    rows = [r for r in csv.DictReader(open(tiny_run.log_dir / "metrics.csv")) if r["split"] == "val"]
    best = max(rows, key=lambda r: float(r["psnr"]))
    ckpt = torch.load(tiny_run.best, weights_only=True)
    assert ckpt["step"] == int(best["step"]) and abs(ckpt["best_psnr"] - float(best["psnr"])) < 1e-4


def test_learning_rate_warms_up_then_decays_to_the_floor():
    f = [loop.lr_factor(s, warmup=10, total=100, min_ratio=0.01) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone cosine decay
    assert f[100] == pytest.approx(0.01)


def emulating_gpu(monkeypatch, native: bool) -> list[dict]:
    """torch.cuda.is_bf16_supported of a GPU that emulates bf16 (True with emulation, like V100 / T4) and computes
    it natively or not; returns the list of the keyword arguments of every call."""
    calls = []

    def is_bf16_supported(**kw):
        calls.append(kw)
        return native or kw.get("including_emulation", True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    return calls


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp16")], ids=["ampere", "v100-t4"])
def test_auto_precision_is_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, native, expected):
    calls = emulating_gpu(monkeypatch, native)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert calls == [{"including_emulation": False}]


def test_auto_precision_is_fp32_on_cpu_and_an_explicit_choice_is_kept(monkeypatch):
    calls = emulating_gpu(monkeypatch, native=False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    for device in ("cpu", "cuda"):
        for p in ("fp32", "bf16", "fp16"):
            assert resolve_precision(p, torch.device(device)) == p
    assert calls == []  # no GPU query where none decides anything


def test_recon_grid_runs_under_the_runs_autocast_and_saves_the_reconstruction(tmp_path):
    from torchvision.io import decode_png, read_file

    class Halve(torch.nn.Module):  # records the autocast state of its forward; recon = x / 2 in the autocast dtype
        def forward(self, x):
            self.autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
            return {"recon": torch.nn.functional.linear(x, torch.eye(x.shape[-1]) / 2)}

    model = Halve().train()
    x = torch.rand(3, 3, 16, 16)
    train.save_grid(model, x, tmp_path / "grid.png", torch.autocast("cpu", dtype=torch.bfloat16))
    assert model.autocast == (True, torch.bfloat16) and model.training
    img = decode_png(read_file(str(tmp_path / "grid.png"))).float() / 255  # (3, 2 * 18 + 2, 3 * 18 + 2)
    bottom = img[:, 20:36, 2:18]  # the first reconstruction: row 2, column 1 (2-pixel padding)
    torch.testing.assert_close(bottom, x[0] / 2, atol=1 / 255 + 2 ** -9, rtol=0)
    assert not (tmp_path / "grid.png.tmp").exists()


def test_default_flags_are_the_model_factories_and_the_loss_config():
    """train.py repeats no default: with no flags it builds exactly the factory configs and LossConfig()."""
    import inspect
    from losses import LossConfig, VAELoss
    from model import dinov2_config, sam_config, tiny_config
    parse = train.get_parser().parse_args
    assert train.model_config(parse([])) == sam_config()
    assert train.model_config(parse(["--encoder", "dinov2"])) == dinov2_config()
    # a random backbone trains every block unless --freeze-blocks says otherwise (frozen random blocks learn nothing)
    assert train.model_config(parse(["--no-pretrained"])) == sam_config(pretrained=False, freeze_blocks=0)
    assert train.model_config(parse(["--no-pretrained", "--encoder", "dinov2"])) == \
        dinov2_config(pretrained=False, freeze_blocks=0)
    assert train.model_config(parse(["--no-pretrained", "--freeze-blocks", "3"])).freeze_blocks == 3
    assert train.model_config(parse(["--tiny", "--weights", "dir"])).freeze_blocks == tiny_config().freeze_blocks == 2
    assert train.loss_config(parse([])) == LossConfig()
    defaults = {k: p.default for k, p in inspect.signature(VAELoss).parameters.items() if k != "image_size"}
    assert defaults == vars(LossConfig())


def test_identity_dims_default_to_an_eighth_of_the_latent_and_cannot_exceed_it():
    from dataclasses import replace
    from model import build_model, tiny_config
    parse = train.get_parser().parse_args
    assert train.model_config(parse(["--no-pretrained"])).identity_dims == 128  # of 1024
    assert train.model_config(parse(["--tiny", "--no-pretrained", "--latent-dim", "64"])).identity_dims == 8
    assert train.model_config(parse(["--no-pretrained", "--identity-dims", "0"])).embedding_dim == 1024  # all of mu
    tiny = ["--tiny", "--no-pretrained", "--latent-dim", "64"]
    identity = r"identity_dims must be 0 or in 2..latent_dim \(64\), got "
    one = ": one entry, L2-normalised, is \\+1 or -1 for every image and tells no identity apart"
    for flags, message in ((["--identity-dims", "65"], identity + "65"), (["--identity-dims", "1"], identity + "1" + one),
                           (["--embed-dim", "1"], r"embed_dim must be 0 \(no head\) or >= 2, got 1" + one),
                           (["--dense-weight", "1", "--dense-dim", "1"], r"dense_dim must be 0 \(no head\) or >= 2, "
                            r"got 1: one channel, L2-normalised, is \+1 or -1 at every point and tells no point apart")):
        cfg = train.model_config(parse([*tiny, *flags]))
        with pytest.raises(ConfigError, match=f"^{message}$"):
            cfg.check()
        with pytest.raises(ConfigError, match=f"^{message}$"):  # the same check, before any backbone loads:
            build_model(replace(cfg, pretrained=True, weights="no/such-weights"))  # not a WeightsUnavailableError
    # an eighth under 2 entries would be no embedding: small latents embed with all of mu
    assert [tiny_config(latent_dim=d).identity_dims for d in (7, 15, 16, 17)] == [0, 0, 2, 2]


def test_contrastive_gradient_reaches_only_the_identity_entries_of_mu():
    """SupCon and NT-Xent act on model.embedding: mu's first identity_dims entries get their gradient, the rest of mu
    (left to reconstruction) none; the log line says which entries."""
    from losses import nt_xent, supcon
    from model import build_model, tiny_config
    model = build_model(tiny_config(latent_dim=64))  # identity_dims 8
    torch.manual_seed(0)
    mu = torch.randn(6, 64, requires_grad=True)
    for loss in (supcon(model.embedding(mu), torch.tensor([0, 0, 1, 1, 2, 2]), 0.1),
                 nt_xent(model.embedding(mu[:3]), model.embedding(mu[3:]), 0.1)):
        (grad,) = torch.autograd.grad(loss, mu)
        assert grad[:, :8].abs().min() > 0 and not grad[:, 8:].any()
    args = train.get_parser().parse_args([])
    assert train.contrastive_summary("nt-xent", "", args, model.cfg, None) == (
        "NT-Xent between two views rotated and shifted (no zoom or colour jitter) on the first 8 of mu's 64 entries, "
        "weight 0.1, temperature 0.1")
    assert train.contrastive_summary("nt-xent", "", args, tiny_config(identity_dims=0), None).startswith(
        "NT-Xent between two views rotated and shifted (no zoom or colour jitter) on all of mu, weight")


def test_keyed_noise_depends_only_on_seed_epoch_and_sample():
    def noise(keys, epoch=1, view=0):
        return train.keyed_normal(torch.tensor(keys), seed=0, epoch=epoch, view=view, dim=8)

    a, b = noise([3, 7]), noise([7, 3, 9])
    torch.testing.assert_close(a[0], b[1])  # the same sample at another batch position, in another batch
    torch.testing.assert_close(a[1], b[0])
    for i, k in enumerate([7, 3, 9]):
        torch.testing.assert_close(b[i], noise([k])[0])  # a row is the sample's noise alone
    assert len({tuple(row.tolist()) for row in b}) == 3  # each sample its own noise
    assert not torch.equal(a, noise([3, 7], epoch=2))
    assert not torch.equal(a, noise([3, 7], view=1))
    assert not torch.equal(a, train.keyed_normal(torch.tensor([3, 7]), seed=1, epoch=1, view=0, dim=8))


@pytest.mark.slow
def test_missing_data_is_one_line_naming_the_file(tmp_path):
    r = run_cli(*tiny_train_args(tmp_path / "nowhere", tmp_path / "run"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "train_teacher.npy" in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.slow
def test_unreachable_pretrained_weights_are_one_line(synth_dir, tmp_path):
    r = run_cli("--perceptual-weight", "0", "--data-dir", str(synth_dir), "--ckpt-dir", str(tmp_path / "c"),
                "--log-dir", str(tmp_path / "l"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    assert "facebook/sam-vit-base" in r.stderr and "--no-pretrained" in r.stderr


@pytest.mark.slow
def test_unreachable_vgg_weights_suggest_disabling_the_term(synth_dir, tmp_path):
    args = tiny_train_args(synth_dir, tmp_path)
    i = args.index("--perceptual-weight")
    args[i + 1] = "1.5"
    r = run_cli(*args, "--vgg-weights", str(tmp_path / "missing_vgg.pth"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "missing_vgg.pth" in r.stderr and "--perceptual-weight 0" in r.stderr


@pytest.mark.slow
def test_tiny_without_weights_flag_asks_to_be_explicit(synth_dir, tmp_path):
    r = run_cli("--tiny", "--data-dir", str(synth_dir), "--ckpt-dir", str(tmp_path / "c"))
    assert r.returncode == 1 and "--no-pretrained" in r.stderr and "Traceback" not in r.stderr


def test_a_new_run_never_overwrites_an_earlier_one(tiny_run):
    before = tiny_run.last.read_bytes()
    r = run_cli(*tiny_train_args(tiny_run.data_dir, tiny_run.run_dir, "--epochs", "1"))
    assert r.returncode == 1 and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert tiny_run.last.read_bytes() == before


@pytest.mark.slow
def test_out_of_memory_is_one_line_naming_the_batch_size_and_the_ways_out(synth_dir, tmp_path):
    script = ("import runpy, sys, torch, model\n"
              "def boom(cfg):\n"
              "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 6.40 GiB')\n"
              "model.build_model = boom\n"
              "sys.argv = ['train.py', *sys.argv[1:]]\n"
              "runpy.run_path('train.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", script, *tiny_train_args(synth_dir, tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    # the run's batch of 8 halved, the accumulation doubled: the same global batch
    for needle in ("out of GPU memory at --batch-size 8", "--batch-size 4 --accum-steps 2", "--grad-checkpointing",
                   "--input-size"):
        assert needle in r.stderr, (needle, r.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("flags,needle", [
    (["--input-size", "100"], "input_size 100"),
    (["--freeze-blocks", "9"], "freeze_blocks"),
    (["--identity-dims", "1"], "identity_dims must be 0 or in 2..latent_dim (64), got 1: one entry"),
    (["--dense-dim", "8"], "--dense-dim 8: a dense projection head needs the dense term that trains it"),
    pytest.param(["--attn", "flex"], "CUDA only", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                           reason="flex trains on CUDA")),
])
def test_a_model_flag_out_of_range_is_one_line(synth_dir, tmp_path, flags, needle):
    r = run_cli(*tiny_train_args(synth_dir, tmp_path), *flags)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("error: ") and needle in r.stderr


def smallest_tiny(encoder: str = "sam", **overrides):
    """tiny_config with 1 of its 4 blocks (windowed attention) and 1 of its 5 decoder stages: the same code paths
    (patch embedding, a SAM block, neck, VAE head, a decoder stage, output conv) in the smallest graph for
    torch.compile. Compiling is mostly the C++ compiler's time on the generated kernels: on 2 cores ~59 s for the
    training and validation graphs of 2 blocks and 2 stages, ~40 s for these."""
    enc = {**tiny_config(encoder).encoder_config, "num_hidden_layers": 1, "global_attn_indexes": []}
    return tiny_config(encoder, **{"encoder_config": enc, "feature_blocks": (0,), "freeze_blocks": 0,
                                   "decoder_channels": (8,), "fuse_channels": 16, **overrides})


@pytest.mark.slow
def test_compile_trains_like_eager_and_saves_the_same_checkpoint_layout(synth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "tiny_config", smallest_tiny)  # what --tiny builds, in this test only
    kernels = tmp_path / "inductor"  # where inductor writes the kernels it generates: proof that it compiled
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(kernels))
    steps = ["--epochs", "1", "--max-steps", "3", "--latent-dim", "16"]
    try:
        train.main(tiny_train_args(synth_dir, tmp_path / "eager", *steps))
        assert not any(kernels.rglob("*.cpp"))
        train.main(tiny_train_args(synth_dir, tmp_path / "compiled", *steps, "--compile"))
        assert any(kernels.rglob("*.cpp"))
    finally:
        torch._dynamo.reset()  # the test process goes on without this model's compiled graphs
    losses = {name: [float(row["loss"]) for row in csv.DictReader(open(tmp_path / name / "logs/metrics.csv"))
                     if row["split"] == "train"] for name in ("eager", "compiled")}
    assert len(losses["eager"]) == 3 and losses["eager"][0] > losses["eager"][-1]  # it trained
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3)  # fused kernels: rounding differs only
    a = torch.load(tmp_path / "eager/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "compiled/checkpoints/last.pt", weights_only=True)
    assert list(a["model_config"]["decoder_channels"]) == [8]  # the smallest model was the one trained
    assert list(a["model"]) == list(b["model"])  # compiled in place: no `_orig_mod.` prefixes, loads without --compile


@pytest.mark.slow
@pytest.mark.parametrize("weight", ["0", "0.1"])  # no contrastive term, NT-Xent (synth_dir has no identity labels)
def test_nt_xent_views_keep_the_identity_and_other_runs_augment_fully(synth_dir, tmp_path, monkeypatch, weight):
    """NT-Xent's positives are augmentations of one image: its views are rotated and shifted, not zoomed or colour
    jittered (AugConfig.keeping_identity); every other run trains on the full augmentation."""
    used = []
    monkeypatch.setattr(train, "augment", lambda x, keys, seed, epoch, cfg, view: used.append((cfg, view)) or x.float())
    monkeypatch.setattr(train, "tiny_config", smallest_tiny)
    train.main(tiny_train_args(synth_dir, tmp_path, "--epochs", "1", "--max-steps", "1", "--latent-dim", "16",
                               "--contrastive-weight", weight))
    expected = data.AugConfig().keeping_identity() if weight != "0" else data.AugConfig()
    assert used and all(cfg == expected for cfg, _ in used)
    assert sorted({view for _, view in used}) == ([0, 1] if weight != "0" else [0])


@pytest.mark.slow
def test_dense_term_encodes_a_further_view_and_logs_its_loss(synth_dir, tmp_path, monkeypatch):
    """--dense-weight: each step augments a DENSE_AUG view of every image (the view index after the training
    views, so its draws are its own) that the encoder reads beside the training view; metrics.csv logs the term,
    which starts near chance (log of the grid's points) and is finite; --dense-dim's projection head is trained."""
    used, real = [], train.augment
    monkeypatch.setattr(train, "augment", lambda x, keys, seed, epoch, cfg, view: used.append((cfg, view)) or
                        real(x, keys, seed, epoch, cfg, view))
    monkeypatch.setattr(train, "tiny_config", smallest_tiny)
    train.main(tiny_train_args(synth_dir, tmp_path, "--epochs", "1", "--max-steps", "2", "--latent-dim", "16",
                               "--dense-weight", "1", "--dense-dim", "8"))
    assert [u for i, u in enumerate(used) if u not in used[:i]] == [(train.DENSE_AUG, 1), (data.AugConfig(), 0)]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    torch.manual_seed(0)  # the run's seed: the model as the run built it
    init = build_model(config_from_checkpoint(ckpt)).dense_head.state_dict()
    trained = ckpt["model"]
    assert all(not torch.equal(trained[f"dense_head.{k}"], v) for k, v in init.items())
    rows = [r for r in csv.DictReader(open(tmp_path / "logs" / "metrics.csv")) if r["split"] == "train"]
    dense = [float(r["dense"]) for r in rows]
    assert len(dense) == 2 and all(0 < d < 2 * math.log(train.DENSE_GRID ** 2) for d in dense)
    assert all(r["dense"] == "" for r in csv.DictReader(open(tmp_path / "logs" / "metrics.csv"))
               if r["split"] == "val")  # validation has no second view


@pytest.mark.slow
def test_dense_term_with_nt_xent_compares_the_first_view(synth_dir, tmp_path, monkeypatch):
    """With NT-Xent's two views per image the dense term takes view 0's maps (the first B of 2B) beside the dense
    view's B."""
    monkeypatch.setattr(train, "tiny_config", smallest_tiny)
    train.main(tiny_train_args(synth_dir, tmp_path, "--epochs", "1", "--max-steps", "1", "--latent-dim", "16",
                               "--contrastive-weight", "0.1", "--contrastive", "nt-xent", "--dense-weight", "1"))
    row = next(r for r in csv.DictReader(open(tmp_path / "logs" / "metrics.csv")) if r["split"] == "train")
    assert 0 < float(row["dense"]) < 2 * math.log(train.DENSE_GRID ** 2) and float(row["contrastive"]) > 0


def test_contrastive_mode_supcon_where_labels_exist_nt_xent_without(synth_dir, tmp_path):
    import numpy as np
    import synth
    synth.write_synthetic_identities(tmp_path, k=3, views=2, seed=0)  # 6 images of 3 identities, identity column
    labelled = data.EarDataset(tmp_path / "train_teacher.npy")
    plain = data.EarDataset(synth_dir / "train_teacher.npy")  # factors CSV without an identity column
    args = lambda *argv: train.get_parser().parse_args(list(argv))  # noqa: E731
    mode, labels, why = train.contrastive_mode(parsed := args(), labelled)
    assert mode == "supcon" and labels.tolist() == np.repeat([0, 1, 2], 2).tolist() and why == ""
    assert parsed.images_per_identity == 2  # the default batch of 4: 2 identities x 2 images, kept in the checkpoint
    assert train.contrastive_mode(args(), plain) == ("nt-xent", None, "")
    assert train.contrastive_mode(args("--contrastive", "nt-xent"), labelled) == ("nt-xent", None, "")
    assert train.contrastive_mode(args("--contrastive-weight", "0"), labelled) == ("off", None, "")
    with pytest.raises(DataError, match=r"--contrastive supcon needs identity labels: .*train_index.csv does not "
                                             r"exist; .*train_factors.csv has no 'identity' column$"):
        train.contrastive_mode(args("--contrastive", "supcon"), plain)
    # a batch that cannot hold 2 identities has no negatives: auto falls back to NT-Xent and says why, supcon refuses
    mode, labels, why = train.contrastive_mode(args("--batch-size", "2"), labelled)
    assert (mode, labels) == ("nt-xent", None)
    assert why == (" (not SupCon: --batch-size 2 cannot hold 2 identities of 2 images (SupCon needs a batch of 4 or "
                   "more: its negatives are the other identities))")
    with pytest.raises(ConfigError, match="^--contrastive supcon: --batch-size 3 cannot hold 2 identities"):
        train.contrastive_mode(args("--batch-size", "3", "--contrastive", "supcon"), labelled)
    with pytest.raises(ConfigError, match="^--images-per-identity 4: --batch-size 4 must be a multiple of it "
                                                "holding at least 2 identities"):
        train.contrastive_mode(args("--images-per-identity", "4"), labelled)
    # 3 identities x K=4 fill no batch of 16 (the sampler draws whole identities): auto trains NT-Xent, supcon refuses
    assert train.contrastive_mode(args("--batch-size", "16"), labelled) == (
        "nt-xent", None, " (not SupCon: 3 identities x K=4 images do not fill one global batch of 16)")
    with pytest.raises(DataError, match="--contrastive supcon cannot train on its identity labels: 3 identities "
                                             "x K=2 images do not fill one global batch of 8$"):
        train.contrastive_mode(args("--batch-size", "4", "--contrastive", "supcon"), labelled, world=2)
    with pytest.raises(ConfigError, match="--embed-dim 8: an embedding head needs the contrastive term"):
        train.contrastive_mode(args("--contrastive-weight", "0", "--embed-dim", "8"), labelled)


def test_a_dense_head_needs_the_dense_term():
    parse = train.get_parser().parse_args
    with pytest.raises(ConfigError, match=r"^--dense-dim 16: a dense projection head needs the dense term that trains "
                                          r"it \(--dense-weight > 0\)$"):
        train.model_config(parse(["--tiny", "--no-pretrained", "--dense-dim", "16"]))
    assert train.model_config(parse(["--tiny", "--no-pretrained", "--dense-dim", "16", "--dense-weight", "1"])
                              ).dense_dim == 16


@pytest.mark.parametrize("batch, k", [(4, 2), (6, 3), (8, 4), (10, 2), (16, 4), (2, None), (5, None)])
def test_images_per_identity_default_holds_two_identities_or_more(batch, k):
    args = train.get_parser().parse_args(["--batch-size", str(batch)])
    assert train.images_per_identity(args) == k


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_config_error_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"^--device cuda: no CUDA device is available \(use --device cpu\)$"):
        train.main(["--device", "cuda", "--ckpt-dir", str(tmp_path / "c"), "--log-dir", str(tmp_path / "l")])
    assert not any(tmp_path.iterdir())


def test_a_resumed_supcon_run_whose_batch_does_not_fit_its_k_names_the_batch_size():
    """K comes from the checkpoint when resuming (a typed --images-per-identity is ignored): the message says so."""
    args = train.get_parser().parse_args(["--batch-size", "4", "--accum-steps", "2", "--images-per-identity", "4"])
    args.resume = "auto"
    with pytest.raises(ConfigError, match=r"^--batch-size 4: this run's SupCon batches hold K=4 images of each "
                                                r"identity \(its --images-per-identity, kept from the checkpoint\), so "
                                                r"the batch must be a multiple of 4 of at least 8"):
        train.images_per_identity(args)
