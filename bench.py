"""Benchmark the full ViT-B ear teacher: training images/s, step time, peak memory and MFU for the optimised path
beside a baseline configured like the original run (eager attention, fp16 autocast + GradScaler, no gradient
checkpointing) and the optional levers (--attn flex, --compile), and the data pipeline alone. Random weights:
speed does not depend on them.

    python bench.py                                   # GPU: SAM input 1024, 512, 256 at several batch sizes
    python bench.py --grad-checkpointing --max-batch  # also checkpointing, and the largest batch that fits
    python bench.py --sizes 256 --batch-sizes 1 2     # a CPU-sized run
    python bench.py --markdown BENCHMARKS.md          # also append the tables there (device, command, date)
    python bench.py --json bench.json                 # also every figure as JSON
    python bench.py --estimate-memory                 # no GPU needed: estimated peak memory at 1024, batch 1-16
    python bench.py --students mobilenet_v3_small     # inference: students beside the SAM ViT-B teacher at 1024
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
import weakref
from dataclasses import asdict, replace
from datetime import date
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from data import AugConfig, EarDataset, ResumableSampler, augment, make_loader
from synth import write_synthetic
from losses import LossConfig, VAELoss
from model import build_model, sam_config
from inference import PRECISIONS, clock, resolve_precision, autocast as inference_autocast
from cli import HelpFormatter, int_range, non_negative_int, positive_int, safe_console
from files import check_output_file, save_json, write_outputs
from student import ARCHS, Student, StudentConfig, teacher_targets

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU (from its name), None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def random_vgg_file() -> str:
    """A VGG16 features state dict with random weights: the perceptual term costs the same as with ImageNet's.
    Built by torchvision's own make_layers (what vgg16() uses for `features`), without vgg16's 124M-parameter
    classifier, whose random initialisation took minutes on a loaded CPU."""
    from torchvision.models.vgg import cfgs, make_layers
    path = os.path.join(tempfile.mkdtemp(), "vgg16_random.pth")
    torch.save(make_layers(cfgs["D"]).state_dict(), path)
    return path


def default_loss(vgg: str, image_size: int) -> VAELoss:
    """The default training loss (LossConfig, where train.py's loss flags read their defaults), with the VGG16
    weights from `vgg`."""
    loss_cfg = replace(LossConfig(), vgg_weights=vgg)
    return VAELoss(**asdict(loss_cfg), image_size=image_size)


# FLOPs of one training step per (input_size, batch), counted once on the plain optimised path: every variant does
# the same model math, and MFU counts model FLOPs (not gradient checkpointing's recomputation)
MODEL_FLOPS: dict[tuple[int, int], float] = {}

# what each measured variant changes; "optimised" is train.py's default path
VARIANTS = {
    "baseline": dict(attn="eager", precision="fp16", fused=False, compile=False),  # like the original run
    "optimised": dict(attn="sdpa", precision="auto", fused=True, compile=False),
    "flex": dict(attn="flex", precision="auto", fused=True, compile=False),        # --attn flex (CUDA only)
    "compiled": dict(attn="sdpa", precision="auto", fused=True, compile=True),     # --compile
}


def measure(variant: str, input_size: int, batch: int, device: torch.device, vgg: str, steps: int,
            grad_checkpointing: bool = False, probe: bool = False) -> dict:
    """One configuration: forward ms, train step ms, images/s, FLOPs per step, MFU, status ("OK" or "OOM") and, on
    CUDA, peak memory (GiB, torch.cuda.max_memory_allocated): of training (peak_gib) and of the no-grad forward of
    `batch` images as eval.py runs it (fwd_peak_gib: the forward's own peak above what training left allocated,
    plus the model's parameters and buffers). probe: only whether training fits, two steps (the second with AdamW's
    state), nothing timed or counted."""
    v = VARIANTS[variant]
    precision = resolve_precision(v["precision"], device) if device.type == "cuda" else "fp32"
    dtype = PRECISIONS[precision]
    row = dict(variant=variant, input_size=input_size, batch=batch, precision=precision,
               grad_ckpt=grad_checkpointing, status="OK")
    model = criterion = opt = None
    try:
        cfg = sam_config(pretrained=False, input_size=input_size, grad_checkpointing=grad_checkpointing,
                         attn_implementation=v["attn"])
        model = build_model(cfg).to(device).train()
        if v["compile"]:
            model.compile()
        criterion = default_loss(vgg, cfg.image_size).to(device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                fused=v["fused"])
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        autocast = inference_autocast(device, dtype)  # as train.py: fp32 -> no autocast at all
        x = torch.rand(2 * batch, 3, 128, 128, device=device)  # two augmented views of `batch` images

        def step():
            with autocast:
                out = model(x)
                loss, _ = criterion(out["recon"], x, out["mu"], out["logvar"], views=2)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step()  # warm-up (and compilation)
        if probe:
            step()
            sync()
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
            return row
        if (input_size, batch) not in MODEL_FLOPS and variant == "optimised" and not grad_checkpointing:
            with FlopCounterMode(display=False) as counter:
                step()
            MODEL_FLOPS[input_size, batch] = counter.get_total_flops()
        flops = MODEL_FLOPS.get((input_size, batch))
        step()
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        step_s = (time.perf_counter() - t) / steps
        peak_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        model.eval()
        with torch.no_grad(), autocast:
            model(x[:batch])
            sync()
            if device.type == "cuda":
                weights = sum(w.nbytes for w in [*model.parameters(), *model.buffers()])
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                model(x[:batch])
                sync()
                row["fwd_peak_gib"] = (torch.cuda.max_memory_allocated(device) - before + weights) / 2 ** 30
            t = time.perf_counter()
            for _ in range(steps):
                model(x[:batch])
            sync()
        fwd_s = (time.perf_counter() - t) / steps
        peak = peak_tflops(device)
        row.update(forward_ms=1e3 * fwd_s, step_ms=1e3 * step_s, img_s=batch / step_s,
                   tflop_step=flops / 1e12 if flops else None,
                   mfu=flops / step_s / (peak * 1e12) if peak and flops else None, peak_gib=peak_gib)
    except torch.OutOfMemoryError:
        row["status"] = "OOM"  # a measured outcome, not an error: the table shows where memory runs out
    finally:
        model = criterion = opt = None
        if v["compile"]:
            torch._dynamo.reset()  # each configuration compiles afresh (dynamo's recompile limit would end it)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# -----------------------------------------------------------------------------
# memory without a GPU: the training step on fake tensors (shapes only), counting the bytes of every live storage

class LiveBytes(TorchDispatchMode):
    """Counts the bytes of each storage an op creates until it is freed; `peak` is the most alive at once. Storages
    that existed before (the parameters) are not counted."""
    supports_higher_order_operators = True  # flex attention is one: its outputs are counted like any op's

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.sizes = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(storage := t.untyped_storage()) not in self.sizes:
                self.sizes[id(storage)] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, id(storage))
        return out

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)


def estimate_peak_gib(input_size: int, batch: int, attn: str, grad_checkpointing: bool, vgg: str) -> float:
    """Estimated peak GPU memory (GiB) of train.py's default bf16 training step (two views of `batch` images, the
    whole loss, backward, fused AdamW) for the full ViT-B model, without a GPU: the step runs twice (the second with
    AdamW's state) on fake tensors, which have shapes but no data, and every storage created is counted until it is
    freed; parameters and buffers are added. Where the CPU's kernels would keep other tensors than CUDA's, CUDA's
    are modelled: SDPA with SAM's float mask runs memory-efficient attention (no (N, N) scores kept; its backward
    makes the mask's gradient), and flex runs the fused kernel's fake rule (no scores). bf16 autocast is the CPU's,
    which casts the same matmuls and convolutions. Not counted: the CUDA context, cuBLAS / cuDNN workspaces and the
    caching allocator's rounding and fragmentation, so a measured peak is higher."""
    import torch.nn.attention.flex_attention as flex
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = build_model(sam_config(pretrained=False, input_size=input_size, attn_implementation=attn,
                                   grad_checkpointing=grad_checkpointing)).train()
    criterion = default_loss(vgg, model.cfg.image_size)
    fixed = sum(t.nbytes for m in (model, criterion) for t in [*m.parameters(), *m.buffers()])
    fake = FakeTensorMode()
    with fake:  # the same modules, every parameter and buffer swapped for a fake of its shape
        for m in [*model.modules(), *criterion.modules()]:
            for tensors in (m._parameters, m._buffers):
                for k, t in tensors.items():
                    if t is not None:
                        f = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
                        tensors[k] = nn.Parameter(f, t.requires_grad) if isinstance(t, nn.Parameter) else f

    def efficient_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        grad = q.requires_grad or k.requires_grad or v.requires_grad
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, grad, scale=scale)[0]

    saved = F.scaled_dot_product_attention, flex._validate_device, flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    F.scaled_dot_product_attention = efficient_sdpa  # what CUDA runs for a float mask
    flex._validate_device = lambda *a: None  # the flex op's fake rule (outputs only) also for CPU fakes
    flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True  # the op itself, not an eager compile of it
    try:
        with fake, LiveBytes() as mem, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # by design
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
            x = torch.rand(2 * batch, 3, model.cfg.image_size, model.cfg.image_size)  # two views of each image
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(x)
                    loss, _ = criterion(out["recon"], x, out["mu"], out["logvar"], views=2)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del out, loss
    finally:
        F.scaled_dot_product_attention, flex._validate_device, flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = saved
    return (fixed + mem.peak) / 2 ** 30


def estimate_table(sizes: list[int], batches: list[int], vgg: str,
                   on_row: Callable[[list[dict]], None] | None = None) -> tuple[str, list[dict]]:
    """The estimate for each input size and batch: sdpa and flex attention, each without and with gradient
    checkpointing; a column for the measured peak (bench.py's peak GiB on a GPU) to fill in. Returns the markdown
    table and its rows (input_size, batch, attn, grad_ckpt, est_gib); on_row: called with the rows so far after
    each."""
    lines = ["| SAM input | batch | attention | grad ckpt | estimated peak GiB | measured peak GiB |", "|" + "---|" * 6]
    rows = []
    for size in sizes:
        for b in batches:
            for attn, ckpt in (("sdpa", False), ("sdpa", True), ("flex", False), ("flex", True)):
                rows.append(dict(input_size=size, batch=b, attn=attn, grad_ckpt=ckpt,
                                 est_gib=estimate_peak_gib(size, b, attn, ckpt, vgg)))
                lines.append(f"| {size} | {b} | {attn} | {'yes' if ckpt else 'no'} | {rows[-1]['est_gib']:.1f} | |")
                print(lines[-1], flush=True)
                if on_row is not None:
                    on_row(rows)
    return "\n".join(lines), rows


def data_pipeline(device: torch.device, workers: int, batch: int, n: int = 2048) -> float:
    """Images/s of the real loader (memory-mapped NPY, worker processes) plus on-device augmentation of 2 views."""
    d = tempfile.mkdtemp()
    write_synthetic(d, n_train=n, n_val=batch, seed=0)
    ds = EarDataset(os.path.join(d, "train_teacher.npy"))
    sampler = ResumableSampler(len(ds), batch, seed=0)
    loader = make_loader(ds, batch, sampler, workers)
    aug = AugConfig()
    t, seen = time.perf_counter(), 0
    for x, keys in loader:
        x = x.to(device, non_blocking=True)
        for v in range(2):
            augment(x, keys, 0, 0, aug, view=v)
        seen += len(keys)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - t)


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = ["| variant | SAM input | batch | precision | grad ckpt | forward ms | train step ms | images/s | "
             "TFLOP/step | MFU | peak GiB | forward peak GiB | status |", "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['input_size']} | {r['batch']} | {r['precision']} | "
                     f"{'yes' if r['grad_ckpt'] else 'no'} | {fmt(r.get('forward_ms'), '.0f')} | "
                     f"{fmt(r.get('step_ms'), '.0f')} | {fmt(r.get('img_s'), '.3g')} | "
                     f"{fmt(r.get('tflop_step'), '.2f')} | {fmt(r.get('mfu'), '.1%')} | "
                     f"{fmt(r.get('peak_gib'), '.1f')} | {fmt(r.get('fwd_peak_gib'), '.1f')} | {r['status']} |")
    return "\n".join(lines)


def seed_table() -> None:
    """The seed report's table (batch size, forward time, memory, status) for the optimised full ViT-B model."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = (1, 4, 8) if device.type == "cuda" else (1,)  # CPU: ~1 min per ViT-B step at 1024
    vgg = random_vgg_file()
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} (random weights)")
    print("| SAM input | Batch Size | Forward Time | Train Step | Memory Usage | Status |\n|---|---|---|---|---|---|")
    for size in (1024, 512, 256):
        for b in batches:
            r = measure("optimised", size, b, device, vgg, steps=2)
            print(f"| {size} | {b} | {fmt(r.get('forward_ms'), '.0f')} ms | {fmt(r.get('step_ms'), '.0f')} ms | "
                  f"{fmt(r.get('peak_gib'), '.2f')}{' GiB' if r.get('peak_gib') is not None else ''} | {r['status']} |",
                  flush=True)


def largest_batch(variant: str, input_size: int, device: torch.device, vgg: str, grad_checkpointing: bool,
                  limit: int = 4096, start: int = 8, on_try: Callable[[dict], None] | None = None) -> int:
    """Largest batch whose training step fits in GPU memory: doubling from `start`, then bisection to within ~6%
    (two steps per try, measure's probe). Stops at the first batch past `limit` (returning the last that fit).
    on_try: called with each try's row (batch, status, peak_gib)."""
    def fits(b: int) -> bool:
        row = measure(variant, input_size, b, device, vgg, steps=1, grad_checkpointing=grad_checkpointing, probe=True)
        if on_try is not None:
            on_try(row)
        return row["status"] == "OK"

    lo, hi = 0, start
    while fits(hi):
        lo, hi = hi, 2 * hi
        if hi > limit:
            return lo
    while hi - lo > max(1, lo // 16):  # to within ~6%
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--sizes", type=int_range(16, multiple_of=16), nargs="+", default=None,
                   help="SAM input sizes, multiples of its patch 16 (default: 1024 512 256 on a GPU, 256 on CPU, "
                        "1024 for --estimate-memory)")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=None,
                   help="images per step, each seen in two augmented views as in training (default: 8 32 64 on a "
                        "GPU, 1 2 on CPU, 1 4 8 16 for --estimate-memory)")
    p.add_argument("--steps", type=positive_int, default=10 if cuda else 2, help="timed steps per configuration")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                   default=["optimised", "baseline", "flex", "compiled"] if cuda else ["optimised", "baseline"],
                   help="paths to measure (optimised is always measured: the others are compared with it); "
                        "flex trains on CUDA only")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="also measure every variant with gradient checkpointing")
    p.add_argument("--max-batch", action="store_true", help="GPU: also search the largest batch that fits, with and "
                   "without gradient checkpointing, at the first of --sizes")
    p.add_argument("--workers", type=non_negative_int, default=min(8, os.cpu_count() or 1),
                   help="data loader workers")
    p.add_argument("--markdown", default=None, help="append the results to this file (e.g. BENCHMARKS.md)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every figure to this JSON file (device, "
                   "versions, command, rows, notes); replaced, not appended")
    p.add_argument("--estimate-memory", action="store_true", help="only estimate the peak GPU memory of a bf16 "
                   "training step, no GPU needed (fake tensors): plain, grad checkpointing and flex, at --sizes "
                   "(here default 1024) and --batch-sizes (here default 1 4 8 16)")
    p.add_argument("--students", nargs="+", choices=list(ARCHS), default=None, metavar="ARCH",
                   help=f"only inference speed: each student ({', '.join(ARCHS)}; random weights, input "
                        f"--student-input-size) beside the full SAM ViT-B teacher (encoder + head, what a student "
                        f"replaces) at the first of --sizes (here default 1024), batch --batch-sizes (here default 16)")
    p.add_argument("--student-input-size", type=int_range(32, 1024), default=StudentConfig.input_size,
                   help="the students' input side for --students")
    return p


@torch.no_grad()
def student_speed(archs: list[str], size: int, batch: int, student_input: int, device: torch.device,
                  steps: int) -> list[dict]:
    """Inference images/s, forward only, of the full SAM ViT-B teacher at input `size` (its encoder and VAE head:
    what a student replaces; random weights) and of each student arch at `student_input`, on the same device and
    batch, under the device's automatic precision (fp32 on CPU), each after one untimed warm-up step. -> rows
    {"model", "input", "params_m", "img_s", "speedup"} (speedup: images/s over the teacher's)."""
    precision = resolve_precision("auto", device)
    autocast = inference_autocast(device, PRECISIONS[precision])
    x = torch.rand(batch, 3, 128, 128, device=device)

    def timed(forward: Callable[[], object]) -> float:
        with autocast:
            forward()  # warm-up
            t0 = clock(device)
            for _ in range(steps):
                forward()
            t1 = clock(device)
        return batch * steps / (t1 - t0)

    def row(name: str, input_size: int, model: nn.Module, forward: Callable[[], object]) -> dict:
        r = dict(model=name, input=input_size, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                 img_s=timed(forward))
        print(f"{name}: {r['img_s']:.3g} images/s", flush=True)
        return r

    torch.manual_seed(0)
    teacher = build_model(sam_config(pretrained=False, input_size=size)).to(device).eval()
    rows = [row("SAM ViT-B teacher", size, teacher, lambda: teacher_targets(teacher, x))]
    teacher = None  # its memory, before the students
    cfg = StudentConfig(pretrained=False, latent_dim=sam_config().latent_dim, input_size=student_input)
    for arch in archs:
        student = Student(replace(cfg, arch=arch)).to(device).eval()
        rows.append(row(f"student {arch}", student_input, student, lambda: student(x)))
    for r in rows:
        r["speedup"] = r["img_s"] / rows[0]["img_s"]
    return rows


def main() -> None:
    p = get_parser()
    args = p.parse_args()
    if args.json:
        try:
            check_output_file(args.json)  # before the long work
        except ValueError as e:
            p.error(f"--json {e}")
    cuda = torch.cuda.is_available()
    if args.student_input_size != StudentConfig.input_size and not args.students:
        p.error("--student-input-size is the students' input: add --students ARCH")
    if args.students:
        device = torch.device("cuda" if cuda else "cpu")
        name = (torch.cuda.get_device_name(device) if cuda else
                f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
        size, batch = (args.sizes or [1024])[0], (args.batch_sizes or [16])[0]
        rows = student_speed(args.students, size, batch, args.student_input_size, device, args.steps)
        md = "\n".join(["| model | input | parameters (M) | images/s | x teacher |", "|---|---|---|---|---|",
                         *[f"| {r['model']} | {r['input']} | {r['params_m']:.2f} | {r['img_s']:.3g} | "
                           f"{r['speedup']:,.{0 if r['speedup'] >= 100 else 2}f} |" for r in rows]])
        out = (f"### {date.today()} - {name}: students beside the teacher (inference, batch {batch})\n\n"
               f"`python bench.py {' '.join(sys.argv[1:])}`\n\n{md}\n")
        publish(out, args.markdown)
        if args.json:
            write_outputs({args.json: save_json(dict(run_info(), device=name, complete=True, students=rows))})
        return
    if args.estimate_memory:
        def save(est: list[dict], complete: bool = False) -> None:  # after every row, as the measuring run does
            if args.json:
                write_outputs({args.json: save_json(dict(run_info(), complete=complete, estimates=est))})

        md, est = estimate_table(args.sizes or [1024], args.batch_sizes or [1, 4, 8, 16], random_vgg_file(), save)
        out = (f"### {date.today()} - estimate (fake tensors, no GPU)\n\n`python bench.py {' '.join(sys.argv[1:])}`"
               f"\n\n{md}\n")
        publish(out, args.markdown)
        save(est, complete=True)
        return
    args.sizes = args.sizes or ([1024, 512, 256] if cuda else [256])
    args.batch_sizes = args.batch_sizes or ([8, 32, 64] if cuda else [1, 2])
    if "flex" in args.variants and not cuda:
        p.error("the flex variant trains on CUDA only (PyTorch's FlexAttention has no CPU backward)")
    variants = ["optimised"] + [v for v in args.variants if v != "optimised"]

    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; peak bf16 {peak_tflops(device) or '-'} TFLOP/s", flush=True)
    vgg = random_vgg_file()
    rows, notes, largest = [], [], []

    def save(pipe: float | None = None) -> None:  # after every row: a run cut short keeps what it measured
        if args.json:
            write_outputs({args.json: save_json(dict(run_info(), device=name, complete=pipe is not None, rows=rows,
                                                     largest_batch=largest, data_pipeline_img_s=pipe, notes=notes))})

    for size in args.sizes:
        for b in args.batch_sizes:
            results = {}  # variant -> its row without checkpointing
            for ckpt in (False, True) if args.grad_checkpointing else (False,):
                for v in variants:
                    rows.append(measure(v, size, b, device, vgg, args.steps, grad_checkpointing=ckpt))
                    results.setdefault(v, rows[-1])
                    save()
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
            base = results.get("baseline", {}).get("img_s")
            print(f"input {size} batch {b}: " + ", ".join(
                f"{v} {r.get('img_s', 0):.3g} img/s ({r['status']}"
                + (f", {r['img_s'] / base:.2f}x baseline" if base and "img_s" in r and v != "baseline" else "") + ")"
                for v, r in results.items()), flush=True)
    if args.max_batch and cuda:
        for ckpt in (False, True):
            n = largest_batch("optimised", args.sizes[0], device, vgg, ckpt)
            largest.append(dict(variant="optimised", input_size=args.sizes[0], grad_ckpt=ckpt, batch=n))
            notes.append(f"Largest batch that fits (optimised, input {args.sizes[0]}, "
                         f"{'with' if ckpt else 'without'} gradient checkpointing): {n}")
            print(notes[-1], flush=True)
            save()
    pipe = data_pipeline(device, args.workers, max(args.batch_sizes))
    fastest = max((r["img_s"] for r in rows if "img_s" in r), default=None)
    notes.append(f"Data pipeline ({args.workers} workers, memory-mapped NPY + on-device augmentation of 2 views): "
                 f"{pipe:.0f} images/s" + (f", {pipe / fastest:.1f}x the fastest training rate above" if fastest else ""))
    out = (f"### {date.today()} - {name}{' (CPU figures)' if not cuda else ''}\n\n"
           f"`python bench.py {' '.join(sys.argv[1:])}`\n\n{table(rows)}\n\n" + "\n\n".join(notes) + "\n")
    publish(out, args.markdown)
    save(pipe)


def publish(text: str, markdown: str | None) -> None:
    """Print a result's markdown section, and append it to the --markdown file when one is given."""
    print("\n" + text)
    if markdown:
        with open(markdown, "a") as f:
            f.write("\n" + text)


def run_info() -> dict:
    """What a JSON result names: command, date, torch / transformers versions, CUDA device (or None)."""
    import transformers
    return dict(command=f"python bench.py {' '.join(sys.argv[1:])}", date=str(date.today()), torch=torch.__version__,
                transformers=transformers.__version__,
                cuda_device=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


if __name__ == "__main__":
    safe_console()
    main()
