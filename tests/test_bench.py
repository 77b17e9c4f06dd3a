"""bench.py: the measuring code runs on this device, and the largest-batch search finds the edge."""
import math

import pytest
import torch

import bench


@pytest.mark.parametrize("edge", [5, 8, 100, 5000])
def test_largest_batch_search_finds_the_edge(monkeypatch, edge):
    tried, seen = [], []

    def fake_measure(variant, input_size, batch, *args, probe=False, **kwargs):
        assert probe  # a try only asks whether it fits: nothing timed or counted
        tried.append(batch)
        return {"batch": batch, "status": "OK" if batch <= edge else "OOM"}

    monkeypatch.setattr(bench, "measure", fake_measure)
    found = bench.largest_batch("optimised", 1024, torch.device("cpu"), "vgg.pth", False, limit=4096,
                                on_try=seen.append)
    assert found <= min(edge, 4096) and found >= min(edge, 4096) * 15 / 16
    assert len(tried) < 25 and [r["batch"] for r in seen] == tried


def test_grad_checkpointing_measures_every_variant_and_json_holds_every_row(monkeypatch, tmp_path):
    """--grad-checkpointing adds each variant's checkpointed row (flex's too, on a GPU), and --json writes the
    rows, notes and versions that the markdown table shows."""
    import json
    measured = []

    def fake_measure(variant, input_size, batch, device, vgg, steps, grad_checkpointing=False, probe=False):
        measured.append((variant, input_size, batch, grad_checkpointing))
        return dict(variant=variant, input_size=input_size, batch=batch, precision="fp32",
                    grad_ckpt=grad_checkpointing, status="OK", img_s=1.0 + grad_checkpointing, step_ms=1.0)

    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setattr(bench, "data_pipeline", lambda device, workers, batch: 123.0)
    monkeypatch.setattr(bench, "random_vgg_file", lambda: "vgg.pth")
    out = tmp_path / "bench.json"
    monkeypatch.setattr("sys.argv", ["bench.py", "--sizes", "64", "--batch-sizes", "1", "2", "--variants",
                                     "optimised", "baseline", "--grad-checkpointing", "--json", str(out)])
    bench.main()
    expected = [(v, 64, b, ckpt) for b in (1, 2) for ckpt in (False, True) for v in ("optimised", "baseline")]
    assert sorted(measured) == sorted(expected) and len(measured) == 8
    result = json.loads(out.read_text())
    assert [(r["variant"], r["input_size"], r["batch"], r["grad_ckpt"]) for r in result["rows"]] == measured
    assert result["complete"] and result["data_pipeline_img_s"] == 123.0 and result["torch"] == torch.__version__
    assert result["cuda_device"] is None and result["largest_batch"] == [] and "--json" in result["command"]


def test_a_json_path_that_cannot_be_written_is_refused_before_any_measurement(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("measured before the --json check"))
    monkeypatch.setattr("sys.argv", ["bench.py", "--json", str(tmp_path)])  # a folder
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2 and f"--json {tmp_path}: is a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_measure_reports_speed_and_model_flops_on_this_device():
    vgg = bench.random_vgg_file()
    row = bench.measure("optimised", 128, 1, torch.device("cpu"), vgg, steps=1)  # full ViT-B, at its smallest input
    assert row["status"] == "OK"
    assert row["img_s"] > 0 and row["step_ms"] > 0 and row["forward_ms"] > 0
    # the forward of the two 128-input views is 0.080 TFLOPs (ViT-B ~0.033, head and decoder ~0.011, VGG16 on the
    # reconstructions and targets ~0.036), the step with its backward ~0.157: counting the forward only, or every
    # op twice (~0.31), falls outside
    assert 0.11 < row["tflop_step"] < 0.25 and math.isfinite(row["tflop_step"])


def test_the_optimised_variant_resolves_precision_like_a_default_training_run(monkeypatch):
    """bench's 'optimised' is train.py's default path: the same precision request, resolved by the same function
    (so on a GPU that only emulates bf16 both run fp16 + GradScaler)."""
    import loop
    import train
    assert bench.VARIANTS["optimised"]["precision"] == train.get_parser().get_default("precision")
    assert bench.resolve_precision is loop.resolve_precision
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert bench.resolve_precision(bench.VARIANTS["optimised"]["precision"], torch.device("cuda")) == "fp16"


def test_the_benchmarked_loss_is_the_default_training_loss(monkeypatch):
    """A changed default changes the benchmark too: bench builds its loss from LossConfig, where train.py's loss
    flags read their defaults."""
    import train
    from losses import LossConfig
    assert train.loss_config(train.get_parser().parse_args([])) == LossConfig()
    seen = {}

    class Built(Exception):
        pass

    def record(**kwargs):
        seen.update(kwargs)
        raise Built

    changed = LossConfig(kl=1e-3, contrastive=0.7)  # as if LossConfig's defaults had changed
    monkeypatch.setattr(bench, "LossConfig", lambda: changed)
    monkeypatch.setattr(bench, "build_model", lambda cfg: torch.nn.Linear(1, 1))
    monkeypatch.setattr(bench, "VAELoss", record)
    with pytest.raises(Built):
        bench.measure("optimised", 256, 1, torch.device("cpu"), "vgg.pth", steps=1)
    expected = {**vars(changed), "vgg_weights": "vgg.pth", "image_size": 128}
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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures GPU memory and trains flex (CUDA only)")
def test_measured_peak_memory_is_near_the_estimate_and_flex_trains_with_checkpointing_on_cuda():
    """The fake-tensor estimate against torch.cuda.max_memory_allocated for the default path and for flex with
    gradient checkpointing (the recomputation calls the compiled kernel inside backward). The estimate leaves out
    workspaces and the allocator's rounding, hence the margin above it."""
    vgg = bench.random_vgg_file()
    for variant, attn, ckpt in (("optimised", "sdpa", False), ("flex", "flex", True)):
        row = bench.measure(variant, 256, 2, torch.device("cuda"), vgg, steps=1, grad_checkpointing=ckpt)
        est = bench.estimate_peak_gib(256, 2, attn, ckpt, vgg)
        assert row["status"] == "OK" and math.isfinite(row["step_ms"]), row
        assert 0.8 * est < row["peak_gib"] < 1.3 * est + 0.25, (variant, ckpt, row["peak_gib"], est)
        assert 0 < row["fwd_peak_gib"] < row["peak_gib"]
