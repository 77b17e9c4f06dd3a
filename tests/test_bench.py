"""bench.py: the measuring code runs on this device, and the largest-batch search finds the edge."""
import math

import pytest
import torch

import bench


@pytest.mark.parametrize("edge", [5, 8, 100, 5000])
def test_largest_batch_search_finds_the_edge(monkeypatch, edge):
    tried = []

    def fake_measure(variant, input_size, batch, *args, **kwargs):
        tried.append(batch)
        return {"status": "OK" if batch <= edge else "OOM"}

    monkeypatch.setattr(bench, "measure", fake_measure)
    found = bench.largest_batch("optimised", 1024, torch.device("cpu"), "vgg.pth", False, limit=4096)
    assert found <= min(edge, 4096) and found >= min(edge, 4096) * 15 / 16
    assert len(tried) < 25


@pytest.mark.slow
def test_measure_reports_speed_and_model_flops_on_this_device():
    vgg = bench.random_vgg_file()
    row = bench.measure("optimised", 256, 1, torch.device("cpu"), vgg, steps=1)
    assert row["status"] == "OK"
    assert row["img_s"] > 0 and row["step_ms"] > 0 and row["forward_ms"] > 0
    # two 256-input views through ViT-B (~35 GMACs each forward), half of it backward, plus decoder and VGG16
    assert 0.2 < row["tflop_step"] < 0.6 and math.isfinite(row["tflop_step"])


def test_the_optimised_variant_resolves_precision_like_a_default_training_run(monkeypatch):
    """bench's 'optimised' is train.py's default path: the same precision request, resolved by the same function
    (so on a GPU that only emulates bf16 both run fp16 + GradScaler)."""
    import train
    assert bench.VARIANTS["optimised"]["precision"] == train.get_parser().get_default("precision")
    assert bench.resolve_precision is train.resolve_precision
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert bench.resolve_precision(bench.VARIANTS["optimised"]["precision"], torch.device("cuda")) == "fp16"


def test_the_benchmarked_loss_is_the_default_training_loss(monkeypatch):
    """A changed train.py default changes the benchmark too: bench builds its loss from train's parser."""
    import train
    seen = {}

    class Built(Exception):
        pass

    def record(**kwargs):
        seen.update(kwargs)
        raise Built

    parser = train.get_parser()
    parser.set_defaults(kl_weight=1e-3, contrastive_weight=0.7)  # as if train.py's defaults had changed
    monkeypatch.setattr(bench, "train_parser", lambda: parser)
    monkeypatch.setattr(bench, "build_model", lambda cfg: torch.nn.Linear(1, 1))
    monkeypatch.setattr(bench, "VAELoss", record)
    with pytest.raises(Built):
        bench.measure("optimised", 256, 1, torch.device("cpu"), "vgg.pth", steps=1)
    expected = {**vars(train.loss_config(parser.parse_args([]))), "vgg_weights": "vgg.pth", "image_size": 128}
    assert seen == expected and seen["kl"] == 1e-3 and seen["contrastive"] == 0.7


def test_live_bytes_counts_what_is_alive_at_once():
    with bench.LiveBytes() as mem:
        a = torch.empty(2 ** 20, dtype=torch.uint8)
        b = torch.empty(2 ** 21, dtype=torch.uint8)
        del a
        c = torch.empty(2 ** 19, dtype=torch.uint8)
        view = b[:10]  # a view makes no new storage
    assert mem.peak == 3 * 2 ** 20 and mem.live == 2 ** 21 + 2 ** 19
    del b, c, view
    assert mem.live == 0


@pytest.mark.slow
def test_memory_estimate_sees_activations_masks_and_checkpointing():
    vgg = bench.random_vgg_file()
    est = {k: bench.estimate_peak_gib(256, b, attn, ckpt, vgg)
           for k, (b, attn, ckpt) in {"plain": (1, "sdpa", False), "batch2": (2, "sdpa", False),
                                      "ckpt": (1, "sdpa", True)}.items()}
    model = bench.build_model(bench.sam_config(pretrained=False, input_size=256))
    params = sum(p.numel() * 4 for p in model.parameters()) / 2 ** 30
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad) / 2 ** 30
    assert est["plain"] > params + 3 * trainable  # weights, gradients and AdamW's two moments, then activations
    assert est["batch2"] > est["plain"]  # activations grow with the batch
    assert est["ckpt"] < est["plain"]  # the trainable blocks' activations are recomputed, not kept
    # at 1024 (4096 tokens) SDPA's dense (B, 12, N, N) bias and its gradient are GiBs; flex keeps neither
    sdpa, flex = (bench.estimate_peak_gib(1024, 1, attn, False, vgg) for attn in ("sdpa", "flex"))
    mask = 2 * 12 * 4096 ** 2 * 2 / 2 ** 30  # two views, bf16
    assert sdpa - flex > 2 * mask
