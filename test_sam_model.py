"""Tests of the SAM-encoder VAE (model.py) with the loss on top; `python test_sam_model.py --bench` prints the
seed's speed/memory table for the full ViT-B configuration (see bench.py for the full benchmark)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub look-up would otherwise retry the network for ~30 s

import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.profiler import ProfilerActivity, profile
from transformers import Dinov2Config, Dinov2Model, SamConfig, SamModel, SamVisionConfig, SamVisionModel
from transformers.models.sam.modeling_sam import SamVisionSdpaAttention

from attention import SamFlexAttention, SamSdpaAttention
from checkpoints import load_model
from errors import CheckpointError, ConfigError, WeightsUnavailableError
from model import LOGVAR_MAX, build_model, parameter_report, sam_config, tiny_config

TINY_SAM = tiny_config("sam").encoder_config
TINY_DINO = tiny_config("dinov2").encoder_config


def tiny_batch(b: int = 4) -> torch.Tensor:
    return torch.rand(b, 3, 128, 128, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved_sam(tmp_path_factory):
    """A tiny SamVisionModel written with save_pretrained, as a user's local weights directory would be."""
    path = tmp_path_factory.mktemp("sam")
    torch.manual_seed(0)
    ref = SamVisionModel(SamVisionConfig(**TINY_SAM))
    with torch.no_grad():  # random, non-zero position embeddings so that loading them can be checked
        ref.vision_encoder.pos_embed.normal_()
    ref.save_pretrained(path)
    return path, ref


def test_random_backbones_start_at_a_usable_scale():
    """transformers' SAM config says initializer_range=1e-10 (weights are meant to be loaded): a random SAM must
    not start at ~0, or the encoder passes nothing and the VAE only learns the mean image."""
    for cfg in (tiny_config("sam"), tiny_config("dinov2"), sam_config(pretrained=False, input_size=256)):
        model = build_model(cfg).eval()
        with torch.no_grad():
            feats = model.encoder.features(tiny_batch(2))
            mu, _ = model.encode(tiny_batch(2))
        for name, f in feats.items():
            assert f.std() > 1e-2, (cfg.encoder, name, f.std().item())
        assert (mu[0] - mu[1]).abs().mean() > 1e-3  # different images, different codes


def test_pretrained_sam_loads_through_the_real_path(saved_sam):
    path, ref = saved_sam
    model = build_model(tiny_config("sam", pretrained=True, weights=str(path)))
    torch.testing.assert_close(model.encoder.blocks[3].attn.qkv.weight, ref.vision_encoder.layers[3].attn.qkv.weight)
    torch.testing.assert_close(model.encoder.final.conv2.weight, ref.vision_encoder.neck.conv2.weight)
    # encoder features equal transformers' own forward on the same (resized, normalised) pixels
    x = tiny_batch(2)
    pixels = (x - model.encoder.pixel_mean) / model.encoder.pixel_std
    with torch.no_grad():
        ours, theirs = model.encoder.features(x)["neck"], ref(pixels).last_hidden_state
    assert theirs.std() > 0.1  # a real comparison, not of two near-zero tensors
    torch.testing.assert_close(ours, theirs)


def test_full_sam_checkpoint_layout_loads_vision_encoder(tmp_path):
    """facebook/sam-vit-base is a whole SamModel (prompt encoder, mask decoder): its vision part must load."""
    torch.manual_seed(1)
    full = SamModel(SamConfig(vision_config=TINY_SAM))
    full.save_pretrained(tmp_path)
    model = build_model(tiny_config("sam", pretrained=True, weights=str(tmp_path)))
    torch.testing.assert_close(model.encoder.blocks[0].mlp.lin1.weight, full.vision_encoder.layers[0].mlp.lin1.weight)


def test_pretrained_dinov2_loads_and_matches_transformers(tmp_path):
    torch.manual_seed(2)
    ref = Dinov2Model(Dinov2Config(**TINY_DINO)).eval()
    ref.save_pretrained(tmp_path)
    model = build_model(tiny_config("dinov2", pretrained=True, weights=str(tmp_path))).eval()
    x = tiny_batch(2)
    pixels = (x - model.encoder.pixel_mean) / model.encoder.pixel_std
    with torch.no_grad():
        ours = model.encoder.features(x)["norm"]  # (B, C, g, g)
        theirs = ref(pixels).last_hidden_state[:, 1:]  # (B, g*g, C) without CLS
    assert theirs.std() > 0.1
    torch.testing.assert_close(ours.flatten(2).transpose(1, 2), theirs)


def test_a_third_backbone_is_one_new_encoder_class(monkeypatch):
    """BACKBONES is the one table of backbone families: a family added there (transformers' plain ViT, below) is
    configured, loaded, frozen and run by the common code, its final map equal to transformers' own output."""
    import encoders as M
    from transformers import ViTConfig, ViTModel

    class VitEncoder(M.Encoder):
        weights, tiny, final_name = "google/vit-base-patch16-224", dict(M._TINY_VIT, intermediate_size=256), "norm"

        @staticmethod
        def transformers_classes():
            return ViTConfig, ViTModel

        def adopt(self, backbone):
            return backbone.embeddings, backbone.layers, backbone.layernorm, backbone.config.hidden_size

        def tokens(self, x):
            return self.embed(x)  # (B, 1 + g*g, C)

        def to_map(self, h):
            return h[:, 1:].transpose(1, 2).reshape(h.shape[0], -1, self.grid, self.grid)

        def final_map(self, h):
            return self.to_map(self.final(h))

    monkeypatch.setitem(M.BACKBONES, "vit", VitEncoder)
    torch.manual_seed(3)
    model = build_model(tiny_config("vit")).eval()
    torch.manual_seed(3)
    ref = ViTModel(ViTConfig(**VitEncoder.tiny)).eval()  # the same random start
    assert [n for n, p in model.encoder.named_parameters() if not p.requires_grad][0] == "embed.cls_token"
    x = tiny_batch(2)
    with torch.no_grad():
        feats = model.encoder.features(x)
        theirs = ref((x - model.encoder.pixel_mean) / model.encoder.pixel_std).last_hidden_state[:, 1:]
    assert set(feats) == {"block1", "block3", "norm"} and theirs.std() > 0.1
    torch.testing.assert_close(feats["norm"].flatten(2).transpose(1, 2), theirs)
    with pytest.raises(ConfigError, match="'vit'"):
        build_model(tiny_config("vit", attn_implementation="flex"))


def test_unreachable_weights_raise_one_clear_error():
    with pytest.raises(WeightsUnavailableError) as e:
        build_model(sam_config(weights="facebook/sam-vit-base"))  # not cached here, and offline
    msg = str(e.value)
    for needle in ("facebook/sam-vit-base", "hf download", "--weights", "--no-pretrained"):
        assert needle in msg, needle
    with pytest.raises(WeightsUnavailableError, match="^/no/such/dir: no such folder of dinov2 weights"):
        build_model(tiny_config("dinov2", pretrained=True, weights="/no/such/dir"))  # a path: no hub advice



def test_an_empty_local_weights_folder_says_what_it_needs_not_a_download(tmp_path):
    with pytest.raises(WeightsUnavailableError) as e:
        build_model(tiny_config("sam", pretrained=True, weights=str(tmp_path)))
    msg = str(e.value)
    assert f"from the local directory {str(tmp_path)!r}" in msg and "config.json + model.safetensors" in msg
    assert "hf download" not in msg and "\n" not in msg and ".." not in msg


def test_incomplete_weights_are_refused_not_randomly_filled(saved_sam, tmp_path):
    path, _ = saved_sam
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    state = load_file(tmp_path / "model.safetensors")
    del state[next(k for k in state if "layers.2" in k)]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsUnavailableError, match="missing"):
        build_model(tiny_config("sam", pretrained=True, weights=str(tmp_path)))


def test_frozen_prefix_and_trainable_counts():
    model = build_model(tiny_config("sam"))
    enc = model.encoder
    frozen = {id(p) for m in (enc.embed, enc.blocks[0], enc.blocks[1]) for p in m.parameters()} | {id(enc.pos_embed)}
    for p in model.parameters():
        assert p.requires_grad == (id(p) not in frozen)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert n_frozen == sum(p.numel() for m in (enc.embed, enc.blocks[0], enc.blocks[1]) for p in m.parameters()) \
        + enc.pos_embed.numel()
    model.train()
    assert [m.training for m in enc.frozen_modules()] == [False, False, False]  # embed, blocks 0-1
    assert enc.blocks[2].training


@pytest.mark.parametrize("encoder", ["sam", "dinov2"])
def test_with_nothing_frozen_every_trainable_parameter_gets_a_gradient(encoder):
    """DDP requires it: an unused trainable parameter (DINOv2's mask token) would stop a multi-GPU run."""
    model = build_model(tiny_config(encoder, freeze_blocks=0)).train()
    x = tiny_batch(2)
    (model(x)["recon"] - x).abs().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_full_vit_b_parameter_breakdown():
    """The original design: SAM ViT-B, first 6 of 12 blocks frozen (patch + position embedding too)."""
    model = build_model(sam_config(pretrained=False, input_size=256))
    enc = model.encoder
    first6 = sum(p.numel() for b in enc.blocks[:6] for p in b.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    embed = sum(p.numel() for p in enc.embed.parameters())
    pos_1024 = 64 * 64 * 768  # counted at the original 1024 input
    assert frozen == embed + 16 * 16 * 768 + first6
    assert 42e6 < embed + pos_1024 + first6 < 47e6  # seed: ~44M frozen
    assert 85e6 < sum(p.numel() for p in enc.parameters()) - enc.pos_embed.numel() + pos_1024 < 95e6  # ViT-B ~90M
    total = sum(p.numel() for p in model.parameters())  # the report's lines agree with these counts
    report = parameter_report({"EarVAE": model}).splitlines()
    assert report[1] == f"Trainable params: {(total - frozen) / 1e6:.1f}M ({100 * (total - frozen) / total:.1f}%)"
    assert report[2] == f"Frozen params:    {frozen / 1e6:.1f}M ({100 * frozen / total:.1f}%)"


@pytest.mark.parametrize("encoder", ["sam", "dinov2"])
def test_forward_shapes_and_ranges(encoder):
    model = build_model(tiny_config(encoder)).train()
    out = model(tiny_batch(4))
    assert out["mu"].shape == out["logvar"].shape == out["z"].shape == (4, 1024)
    assert out["recon"].shape == (4, 3, 128, 128)
    assert out["recon"].min() >= 0
    assert out["recon"].max() <= 1
    assert not torch.equal(out["z"], out["mu"])  # sampled in training
    model.eval()
    with torch.no_grad():
        a, b = model(tiny_batch(4)), model(tiny_batch(4))
    assert torch.equal(a["z"], a["mu"])  # mu in eval
    assert torch.equal(a["recon"], b["recon"])  # deterministic
    torch.testing.assert_close(model.decode(a["mu"]), a["recon"])
    torch.testing.assert_close(model.encode(tiny_batch(4))[0], a["mu"])
    for k, f in model.encoder.features(tiny_batch(4)).items():  # the pyramid the head read
        torch.testing.assert_close(a["features"][k], f)


def test_extra_images_are_encoded_in_the_same_pass_and_change_nothing_else():
    """forward(x, extra=...) (the dense term's views): the dense maps of the extra images are what encoding them
    alone gives, and x's outputs are those of forward(x)."""
    model = build_model(tiny_config()).eval()
    x, extra = tiny_batch(4), tiny_batch(6)[3:]
    with torch.no_grad():
        both, alone, extra_alone = model(x, extra=extra), model(x), model.encoder.features(extra)
    for k in ("recon", "mu", "embedding"):
        torch.testing.assert_close(both[k], alone[k])
    last = model.encoder.final_name  # the dense term's maps without a head: the last map of x and of extra
    torch.testing.assert_close(both["dense"][0], alone["features"][last])
    assert both["dense"][1].shape[0] == 3
    torch.testing.assert_close(both["dense"][1], extra_alone[last])
    assert "dense" not in alone


def test_dense_head_projects_the_last_map_and_trains_with_the_vae_group():
    """dense_dim D > 0: the dense term's maps are dense_head(last map), D channels on the same grid (DenseCL's
    projection head); the head's parameters are in the "vae" optimizer group and nowhere else."""
    model = build_model(tiny_config(dense_dim=8)).eval()
    x, extra = tiny_batch(2), tiny_batch(3)[2:]
    with torch.no_grad():
        out = model(x, extra=extra)
        last = model.encoder.features(torch.cat([x, extra]))[model.encoder.final_name]  # (3, C, g, g)
        want = model.dense_head(last)
    assert want.shape == (3, 8, *last.shape[2:])
    torch.testing.assert_close(torch.cat(out["dense"]), want)
    groups = model.parameter_groups()
    head = {id(p) for p in model.dense_head.parameters()}
    assert head <= {id(p) for p in groups["vae"]} and not head & {id(p) for p in groups["encoder"]}
    assert build_model(tiny_config()).dense_head is None


def test_pyramid_shapes_full_vit_b_and_tiny():
    model = build_model(sam_config(pretrained=False, input_size=256)).eval()
    with torch.no_grad():
        feats = model.encoder.features(tiny_batch(2))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "block2": (2, 768, 16, 16), "block5": (2, 768, 16, 16), "block8": (2, 768, 16, 16),
        "block11": (2, 768, 16, 16), "neck": (2, 256, 16, 16)}
    tiny = build_model(tiny_config("dinov2")).eval()
    with torch.no_grad():
        feats = tiny.encoder.features(tiny_batch(2))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "block1": (2, 64, 16, 16), "block3": (2, 64, 16, 16), "norm": (2, 64, 16, 16)}


@pytest.mark.parametrize("input_size,grid", [(256, 32), (64, 8)])
def test_other_input_sizes_interpolate_position_embedding_once(saved_sam, input_size, grid):
    """Same weights at another SAM input size (the 1024 -> 512 / 256 trade-off, here on the tiny model)."""
    path, ref = saved_sam
    model = build_model(tiny_config("sam", pretrained=True, weights=str(path), input_size=input_size)).eval()
    pe = ref.vision_encoder.pos_embed.permute(0, 3, 1, 2)
    expect = F.interpolate(pe, size=(grid, grid), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(model.encoder.pos_embed, expect)
    with torch.no_grad():
        out = model(tiny_batch(2))
        feats = model.encoder.features(tiny_batch(2))
    assert feats["neck"].shape == (2, 32, grid, grid)
    assert out["recon"].shape == (2, 3, 128, 128)


def test_one_optimizer_step_changes_trainable_and_not_frozen_parameters():
    torch.manual_seed(0)
    model = build_model(tiny_config("sam")).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = tiny_batch(4)
    (model(x)["recon"] - x).abs().mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is None) == (not p.requires_grad), n  # no gradient (nor activations) for the frozen prefix
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_config("sam", grad_checkpointing=ckpt)).train()
        torch.manual_seed(1)
        x = tiny_batch(2)
        (model(x)["recon"] - x).pow(2).mean().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def tiny_sam_with_rel_pos(impl: str, **overrides):
    """Tiny SAM model whose relative-position tables are random: transformers starts them at 0, which would hide a
    wrong bias. Input 80: a 10x10 grid, padded 4x4 windows, tables interpolated from the 16x16 they were made for."""
    torch.manual_seed(0)
    model = build_model(tiny_config("sam", attn_implementation=impl, **{"input_size": 80, **overrides}))
    with torch.no_grad():
        for block in model.encoder.blocks:
            block.attn.rel_pos_h.normal_()
            block.attn.rel_pos_w.normal_()
    return model


def test_attention_implementations_agree_with_a_relative_position_bias():
    """eager (transformers' reference), sdpa and flex (the bias as a FlexAttention score_mod) give one pyramid."""
    feats = {}
    for impl in ("eager", "sdpa", "flex"):
        model = tiny_sam_with_rel_pos(impl).eval()
        with torch.no_grad():
            feats[impl] = model.encoder.features(tiny_batch(2))
    assert type(model.encoder.blocks[1].attn) is SamFlexAttention
    for impl in ("sdpa", "flex"):
        for k, ref in feats["eager"].items():
            torch.testing.assert_close(feats[impl][k], ref, atol=1e-5, rtol=1e-4)
    zero_bias = build_model(tiny_config("sam", input_size=80)).eval()  # the bias really changes the output
    with torch.no_grad():
        assert (zero_bias.encoder.features(tiny_batch(2))["neck"] - feats["eager"]["neck"]).abs().max() > 0.1


def cpu_bytes(fn) -> tuple[object, int, int]:
    """-> (fn(), peak bytes alive at once, bytes allocated in all) on the CPU while fn runs (profiler's memory
    events, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = total = 0
    for e in events:
        live += e.nbytes()  # + allocation, - free
        peak, total = max(peak, live), total + max(e.nbytes(), 0)
    return out, peak, total


def test_sdpa_writes_the_relative_position_mask_once():
    """transformers' SDPA attention reshapes its dense (B, heads, N, N) bias from a permuted-stride sum, a copy that
    keeps two masks alive; SamSdpaAttention writes it once and returns the same output."""
    model = tiny_sam_with_rel_pos("sdpa", input_size=256).eval()  # a 32x32 grid: 1024 tokens in the global block
    block = model.encoder.blocks[1]
    assert type(block.attn) is SamSdpaAttention and block.window_size == 0
    B, g, heads = 2, model.encoder.grid, block.attn.num_attention_heads
    h = torch.randn(B, g, g, model.encoder.hidden_size, generator=torch.Generator().manual_seed(0))
    mask = B * heads * (g * g) ** 2 * 4  # fp32 (B, heads, N, N)
    factors = 2 * B * heads * g * g * g * 4  # rel_h and rel_w (B * heads, g, g, g), now made contiguous
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # SDPA's CPU kernel sizes its scratch buffers by the thread count
    try:
        with torch.no_grad():
            ours, peak, total = cpu_bytes(lambda: block(h))
            block.attn.__class__ = SamVisionSdpaAttention  # transformers' own, same parameters
            theirs, peak_ref, total_ref = cpu_bytes(lambda: block(h))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(ours, theirs)
    assert total_ref - total == mask - factors  # the copy of the mask is gone, nothing else changed
    assert 0.85 * mask < peak_ref - peak <= mask, (peak_ref, peak, mask)


def test_flex_checkpoints_are_interchangeable_with_sdpa():
    """An sdpa model's state dict loads strictly into a flex model of other weights, which then computes the same."""
    sdpa = tiny_sam_with_rel_pos("sdpa").eval()
    torch.manual_seed(1)
    flex = build_model(tiny_config("sam", attn_implementation="flex", input_size=80)).eval()
    assert list(flex.state_dict()) == list(sdpa.state_dict())
    with torch.no_grad():
        ref = sdpa(tiny_batch(2))["recon"]
        assert (flex(tiny_batch(2))["recon"] - ref).abs().max() > 1e-3  # other weights, other output
        flex.load_state_dict(sdpa.state_dict(), strict=True)
        torch.testing.assert_close(flex(tiny_batch(2))["recon"], ref, atol=1e-5, rtol=1e-4)


def test_flex_is_for_sam_only():
    with pytest.raises(ConfigError, match="dinov2"):
        build_model(tiny_config("dinov2", attn_implementation="flex"))


def rel_pos_flex_inputs(b: int, grid: int = 4, heads: int = 2, d: int = 8):
    """q, k, v (b, heads, grid^2, d), SamFlexAttention's score_mod and the tensors it indexes by batch."""
    gen = torch.Generator().manual_seed(b)
    q, k, v = (torch.randn(b, heads, grid * grid, d, generator=gen) for _ in range(3))
    rel_h, rel_w = (torch.randn(b, heads, grid * grid, grid, generator=gen) for _ in range(2))

    def score_mod(score, bi, h, q_idx, kv_idx):
        return score + rel_h[bi, h, q_idx, kv_idx // grid] + rel_w[bi, h, q_idx, kv_idx % grid]
    return q, k, v, score_mod, (rel_h, rel_w)


def test_compiled_flex_compiles_once_per_call_class_and_fails_loudly_past_its_limit(monkeypatch):
    """One compiled flex_attention per call class (shapes but the batch, dtype, grad mode), batch dynamic: new batch
    sizes do not recompile, grad mode is a class of its own, and a class that would compile past its limit raises
    instead of silently running eager. CPU stand-in for CUDA: dynamo's guards and caches are the same, only the
    backend differs (a compile counter that runs the captured graph eagerly)."""
    import attention as M
    from torch._dynamo.testing import CompileCounter
    from torch.nn.attention.flex_attention import flex_attention as reference
    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{"backend": counter, **kw}))  # not flex's own
    monkeypatch.setattr(M, "_compiled_flex", {})
    with torch.no_grad():
        for b in (2, 3, 5):
            q, k, v, mod, tensors = rel_pos_flex_inputs(b)
            out = M.compiled_flex_attention(q, k, v, mod, tensors)
            torch.testing.assert_close(out, reference(q, k, v, score_mod=mod))
        assert (len(M._compiled_flex), counter.frame_count) == (1, 1)
        M.compiled_flex_attention(*rel_pos_flex_inputs(1))  # dynamo specialises a batch of 1: the class's 2nd compile
        assert counter.frame_count == 2
        q, k, v, mod, tensors = rel_pos_flex_inputs(2)
        q = q.transpose(2, 3).contiguous().transpose(2, 3)  # same class, other strides: would be a 3rd compile
        with pytest.raises(RuntimeError, match=f"more than {M.FLEX_RECOMPILE_LIMIT} compiles"):
            M.compiled_flex_attention(q, k, v, mod, tensors)
    M.compiled_flex_attention(*rel_pos_flex_inputs(2))  # grad mode on (inputs without grad: CPU flex has no backward)
    assert (len(M._compiled_flex), counter.frame_count) == (2, 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused FlexAttention kernel and its backward: CUDA")
def test_compiled_flex_matches_sdpa_on_cuda_forward_and_backward(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")  # fp32 matmuls (train.py turns TF32 on)
    monkeypatch.setattr(torch.backends.cudnn.conv, "fp32_precision", "ieee")  # fp32 convs too: only attention differs
    grads, feats = {}, {}
    for impl in ("sdpa", "flex"):
        model = tiny_sam_with_rel_pos(impl, freeze_blocks=0).cuda()
        with torch.no_grad():  # several batch sizes: the compiled kernel meets changing shapes
            feats[impl] = [model.eval().encoder.features(tiny_batch(b).cuda())["neck"] for b in (1, 2, 3, 5)]
        x = tiny_batch(2).cuda()
        out = model.train()(x, eps=torch.zeros(2, model.cfg.latent_dim, device="cuda"))
        (out["recon"] - x).pow(2).mean().backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for a, b in zip(feats["flex"], feats["sdpa"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for n, g in grads["sdpa"].items():
        torch.testing.assert_close(grads["flex"][n], g, atol=1e-5, rtol=1e-3, msg=n)


def test_logvar_is_clamped():
    model = build_model(tiny_config("sam")).eval()
    with torch.no_grad():
        model.head.fc.bias[1024:] = 1e4
        _, logvar = model.encode(tiny_batch(2))
    assert logvar.max() == LOGVAR_MAX


def test_checkpoint_rebuilds_model_without_flags(tmp_path):
    model = build_model(tiny_config("dinov2", latent_dim=64)).eval()
    torch.save({"model": model.state_dict(), "model_config": asdict(model.cfg)}, tmp_path / "m.pt")
    loaded, cfg = load_model(tmp_path / "m.pt")
    assert (cfg.latent_dim, cfg.encoder, loaded.training) == (64, "dinov2", False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tiny_batch(2))["recon"], model(tiny_batch(2))["recon"])


def test_checkpoint_of_another_configuration_fails_loudly(tmp_path):
    model = build_model(tiny_config("sam", latent_dim=64))
    cfg = asdict(tiny_config("sam", latent_dim=32))  # config says 32, weights are for 64
    torch.save({"model": model.state_dict(), "model_config": cfg}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="m.pt"):
        load_model(tmp_path / "m.pt")


def test_vae_loss_terms_finite_with_gradients_into_the_model(tmp_path):
    from torchvision.models import vgg16
    from losses import VAELoss
    torch.save(vgg16().features.state_dict(), tmp_path / "vgg.pth")
    model = build_model(tiny_config("sam")).train()
    criterion = VAELoss(vgg_weights=str(tmp_path / "vgg.pth"))
    x = torch.cat([tiny_batch(3), tiny_batch(3).flip(-1)])  # two views of 3 images, stacked
    out = model(x)
    loss, logs = criterion(out["recon"], x, out["mu"], out["logvar"], views=2)
    assert set(logs) == {"loss", "pixel", "kl", "perceptual", "ssim", "edge", "contrastive"}
    assert all(torch.isfinite(v) for v in logs.values())
    loss.backward()
    for part in (model.head, model.decoder, model.encoder.blocks[3]):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in part.parameters())


if __name__ == "__main__":
    if "--bench" in sys.argv:
        import bench
        bench.seed_table()
    else:
        sys.exit(pytest.main([__file__, "-q"]))
