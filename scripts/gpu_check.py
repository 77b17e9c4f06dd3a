"""The first GPU figures (issue 19): the parts of scripts/gpu_check.sh that are more than one command. The shell
script runs each step under its own `timeout` and records its exit code and seconds in WORK/steps.tsv; the steps
write their results under WORK; `summary` gathers them into OUT/gpu_check.json and OUT/summary.md.

    python scripts/gpu_check.py env WORK             # nvidia-smi, versions, the device -> WORK/env.json
    python scripts/gpu_check.py vgg WORK             # a random VGG16 features file (the device has no network)
    python scripts/gpu_check.py maxbatch WORK        # largest batch at SAM input 1024, default settings
    python scripts/gpu_check.py summary WORK OUT     # everything -> OUT/gpu_check.json, OUT/summary.md

GPU_CHECK_DRY=1 runs the same steps on the CPU at tiny sizes (a rehearsal: no figure of it is a GPU figure).
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DRY = os.environ.get("GPU_CHECK_DRY") == "1"
MAX_BATCH_SIZE = 64 if DRY else 1024  # SAM input of the largest-batch search
SEED_IMG_S = 4.6  # the original run: ~2.3 it/s at batch 2 (seed report)
PACKAGES = ["torch", "torchvision", "transformers", "triton", "numpy", "safetensors", "scikit-image", "scipy",
            "lpips", "matplotlib", "pillow", "tqdm", "pytest", "pytest-xdist", "filelock", "tensorboard"]


def load(path: Path, default=None):
    """A step's JSON result, or `default` where the step wrote none (it failed or ran out of time)."""
    return json.loads(path.read_text()) if path.exists() else default


def write_json(path: Path, obj) -> None:
    from files import save_json, write_outputs
    write_outputs({path: save_json(obj)})


def env(work: Path) -> None:
    """Versions of the packages the code needs (None: not installed), nvidia-smi, and what torch sees."""
    import torch
    smi = shutil.which("nvidia-smi")
    info = dict(
        dry=DRY, python=platform.python_version(), machine=platform.machine(), cpus=os.cpu_count(),
        packages={p: version(p) for p in PACKAGES},
        nvidia_smi=subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout if smi else None,
        cuda=torch.cuda.is_available(), torch_cuda=torch.version.cuda)
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=p.total_memory / 2 ** 30,
                    multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    print(json.dumps({k: v for k, v in info.items() if k != "nvidia_smi"}, indent=1))
    print(info["nvidia_smi"] or "nvidia-smi: not found")
    write_json(work / "env.json", info)


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def vgg(work: Path) -> None:
    """WORK/vgg16_random.pth: bench's random VGG16 features (the perceptual term costs the same as ImageNet's)."""
    import bench
    shutil.move(bench.random_vgg_file(), work / "vgg16_random.pth")


def maxbatch(work: Path) -> None:
    """bench.largest_batch for the default settings (optimised: SDPA, bf16, no checkpointing) at MAX_BATCH_SIZE;
    WORK/maxbatch.json is rewritten after every try, so a step cut short by its timeout still leaves its tries."""
    import torch
    import bench
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = dict(variant="optimised", input_size=MAX_BATCH_SIZE, grad_ckpt=False, tries=[], batch=None)
    t0 = time.perf_counter()

    def record(row: dict) -> None:
        result["tries"].append(dict(batch=row["batch"], status=row["status"], peak_gib=row.get("peak_gib"),
                                    seconds=round(time.perf_counter() - t0, 1)))
        print(result["tries"][-1], flush=True)
        write_json(work / "maxbatch.json", result)

    # dry: no OOM on a CPU, so one try at batch 1, to run the code
    result["batch"] = bench.largest_batch("optimised", MAX_BATCH_SIZE, device, str(work / "vgg16_random.pth"), False,
                                          on_try=record, **(dict(start=1, limit=1) if DRY else {}))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(work / "maxbatch.json", result)


# -----------------------------------------------------------------------------
# summary

def steps(work: Path) -> list[dict]:
    """WORK/steps.tsv (name, exit code, seconds, timeout), as the shell script wrote it."""
    path = work / "steps.tsv"
    if not path.exists():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return [dict(step=n, rc=int(rc), seconds=int(s), timeout=int(cap), timed_out=int(rc) in (124, 137))
            for n, rc, s, cap in rows]


def cuda_tests(work: Path) -> dict | None:
    """Counts and names from pytest's JUnit XML."""
    path = work / "cuda_tests.xml"
    if not path.exists():
        return None
    cases = []
    for case in ET.parse(path).iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        cases.append(dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                          seconds=float(case.get("time", 0))))
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")}
    return dict(counts=counts, cases=cases)


def training(work: Path) -> dict | None:
    """From the 150-step run's metrics.csv: first and last train losses, non-finite steps, images/s, val PSNR."""
    path = work / "run" / "logs" / "metrics.csv"
    if not path.exists():
        return None
    rows = list(csv.DictReader(path.open()))
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    losses = [float(r["loss"]) for r in train]
    head, tail = losses[:3], losses[-3:]
    img_s = sorted(float(r["img_per_s"]) for r in train[1:]) or [math.nan]  # the first interval holds start-up
    return dict(logged_steps=[int(r["step"]) for r in train], losses=losses,
                loss_first3=sum(head) / max(len(head), 1), loss_last3=sum(tail) / max(len(tail), 1),
                loss_falls=bool(losses) and sum(tail) / len(tail) < sum(head) / len(head),
                all_finite=all(math.isfinite(x) for x in losses),
                skipped_non_finite=int(train[-1]["skipped"]) if train else None,
                median_img_s=img_s[len(img_s) // 2], val_psnr=[float(r["psnr"]) for r in val])


def mean_image_psnr(data: Path) -> float | None:
    """The trivial baseline of reconstruction: mean PSNR (dB) of each val image against the mean train image."""
    import numpy as np
    import torch
    from losses import psnr
    if not (data / "train_teacher.npy").exists():
        return None
    mean = torch.from_numpy(np.load(data / "train_teacher.npy").astype(np.float32).mean(0) / 255)  # (H, W, 3)
    val = torch.from_numpy(np.load(data / "val_teacher.npy").astype(np.float32) / 255)  # (N, H, W, 3)
    return psnr(val.permute(0, 3, 1, 2), mean.permute(2, 0, 1).expand(len(val), -1, -1, -1)).mean().item()


def with_estimates(rows: list[dict], estimates: list[dict]) -> list[dict]:
    """bench rows with est_gib added where the estimate models the variant (sdpa or flex, not compiled)."""
    import bench
    est = {(e["input_size"], e["batch"], e["attn"], e["grad_ckpt"]): e["est_gib"] for e in estimates}
    out = []
    for r in rows:
        v = bench.VARIANTS[r["variant"]]
        e = est.get((r["input_size"], r["batch"], v["attn"], r["grad_ckpt"])) if not v["compile"] else None
        out.append({**r, "est_gib": e,
                    "measured_over_est": r["peak_gib"] / e if e and r.get("peak_gib") is not None else None})
    return out


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summary(work: Path, out: Path) -> None:
    env_ = load(work / "env.json", {})
    bench_ = load(work / "bench.json", {})
    est = load(work / "estimate.json", {}).get("estimates", [])
    rows = with_estimates(bench_.get("rows", []), est)
    result = dict(dry=DRY, env=env_, steps=steps(work), bench=dict(bench_, rows=rows), estimates=est,
                  maxbatch=load(work / "maxbatch.json"), cuda_tests=cuda_tests(work), training=training(work),
                  mean_image_psnr_db=mean_image_psnr(work / "data"), eval=load(work / "eval" / "metrics.json"),
                  eigenears=load(work / "eigenears" / "summary.json"))
    write_json(out / "gpu_check.json", result)
    (out / "summary.md").write_text(markdown(result))
    print((out / "summary.md").read_text())


def markdown(r: dict) -> str:
    e, pk = r["env"], r["env"].get("packages", {})
    device = e.get("device") or f"CPU ({e.get('cpus')} cores)"
    lines = [f"# gpu_check{' (DRY RUN on CPU: no figure here is a GPU figure)' if r['dry'] else ''}", "",
             f"{device}, torch {pk.get('torch')}, transformers {pk.get('transformers')}, triton {pk.get('triton')}, "
             f"lpips {pk.get('lpips')}, Python {e.get('python')}"
             + (f"; capability {e['capability']}, {e['memory_gib']:.1f} GiB, {e['multiprocessors']} SMs, "
                f"native bf16 {e['bf16']}" if e.get("cuda") else ""), "",
             "## Steps", "", "| step | exit code | seconds | timeout |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['rc']}{' (timed out)' if s['timed_out'] else ''} | {s['seconds']} | {s['timeout']} |"
              for s in r["steps"]]
    b = r["bench"]
    lines += ["", "## bench.py", "", f"`{b.get('command', '(no result)')}`", "",
              "| variant | SAM input | batch | grad ckpt | train step ms | images/s | MFU | peak GiB | estimated GiB | "
              "measured / estimate | forward peak GiB | status |", "|" + "---|" * 12]
    for x in b.get("rows", []):
        lines.append(f"| {x['variant']} | {x['input_size']} | {x['batch']} | {'yes' if x['grad_ckpt'] else 'no'} | "
                     f"{fmt(x.get('step_ms'), '.0f')} | {fmt(x.get('img_s'), '.3g')} | {fmt(x.get('mfu'), '.1%')} | "
                     f"{fmt(x.get('peak_gib'), '.2f')} | {fmt(x.get('est_gib'), '.2f')} | "
                     f"{fmt(x.get('measured_over_est'), '.2f')} | {fmt(x.get('fwd_peak_gib'), '.2f')} | {x['status']} |")
    best = max((x["img_s"] for x in b.get("rows", []) if x.get("img_s")), default=None)
    if best:
        lines.append(f"\nFastest: {best:.3g} images/s, {best / SEED_IMG_S:.1f}x the seed run's {SEED_IMG_S} images/s "
                     f"(batch 2, original code and GPU).")
    if b.get("data_pipeline_img_s"):
        lines.append(f"Data pipeline alone: {b['data_pipeline_img_s']:.0f} images/s.")
    m = r["maxbatch"]
    lines += ["", "## Largest batch (default settings)", ""]
    if m:
        lines.append(f"SAM input {m['input_size']}, {m['variant']}, no grad checkpointing: "
                     f"{m['batch'] if m['batch'] is not None else 'search cut short'}; tries: "
                     + ", ".join(f"{t['batch']} {t['status']} ({fmt(t['peak_gib'], '.1f')} GiB)" for t in m["tries"]))
    t = r["cuda_tests"]
    lines += ["", "## CUDA-only tests (pytest -m cuda)", ""]
    if t:
        lines.append(", ".join(f"{v} {k}" for k, v in t["counts"].items()))
        lines += [f"- {c['outcome']}: {c['test']} ({c['seconds']:.1f} s)" for c in t["cases"]]
    tr = r["training"]
    lines += ["", "## Training, eval, eigenears", ""]
    if tr:
        lines.append(f"Steps logged {tr['logged_steps'][:1]}..{tr['logged_steps'][-1:]}; loss {tr['loss_first3']:.4f} "
                     f"(first 3 logs) -> {tr['loss_last3']:.4f} (last 3): falls {tr['loss_falls']}; all finite "
                     f"{tr['all_finite']}; non-finite steps skipped {tr['skipped_non_finite']}; median "
                     f"{tr['median_img_s']:.1f} images/s; val PSNR {tr['val_psnr']}")
    if r["eval"]:
        ev = r["eval"]
        lines.append(f"eval.py: PSNR {ev['psnr']['mean']:.2f} dB, SSIM {ev['ssim']['mean']:.4f} on {ev['n_images']} "
                     f"val images (mean-image baseline PSNR {fmt(r['mean_image_psnr_db'], '.2f')} dB)")
    g = r["eigenears"]
    if g:
        lines.append(f"eigenears.py: {g['n_fit']} fit / {g['n_eval']} eval images; cumulative variance (fit) "
                     f"{g['cumulative']['fit']}; effective rank {g['effective_rank']}; PSNR of decoded projections "
                     f"{ {k: round(v, 2) for k, v in g['recon_psnr'].items()} }")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    commands = {"env": env, "vgg": vgg, "maxbatch": maxbatch, "summary": summary}
    if len(sys.argv) < 3 or sys.argv[1] not in commands:
        sys.exit(f"usage: python scripts/gpu_check.py {{{','.join(commands)}}} WORK [OUT]")
    commands[sys.argv[1]](*map(Path, sys.argv[2:]))
