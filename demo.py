"""The whole job on the built-in synthetic ears, CPU-sized (7 to 30 minutes on 2 cores, by machine):
synthesise ears -> train the tiny model -> evaluate it -> draw its eigenears -> recognise new identities from its
latents. Every artefact lands in --out.

    python demo.py              # writes demo/
Each step is the command a user would type; it is printed before it runs.
"""
import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cli import int_range, positive_int, safe_console

ROOT = Path(__file__).resolve().parent
BATCH = 16  # the training batch: --n-train is at least one batch
THREADS = "2"  # CPU threads of every step, unless OMP_NUM_THREADS is set: the README's figures are for 2 threads


def run(*args: str) -> None:
    cmd = [sys.executable, *args]
    print(f"\n$ python {shlex.join(args)}", flush=True)
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"error: step failed (exit {r.returncode}): python {shlex.join(args)}")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo", help="folder for data, checkpoints, logs, eval and eigenears")
    p.add_argument("--n-train", type=int_range(BATCH), default=2000,
                   help=f"synthetic training ears (at least one batch of {BATCH})")
    p.add_argument("--n-val", type=int_range(2), default=200, help="synthetic validation ears (a PCA needs 2)")
    p.add_argument("--epochs", type=positive_int, default=8, help="training epochs")
    p.add_argument("--identities", type=int_range(2), default=100,
                   help="new identities (4 views each, none seen in training) that the latents must recognise")
    return p


def main() -> None:
    args = get_parser().parse_args()
    out = Path(args.out)
    if out.exists():
        sys.exit(f"error: {out}/ exists from an earlier demo: delete it or pass --out NEW_DIR")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny model needs no download
    # A float sum's order, hence the last bits of every figure, depends on the thread count and the CPU's vector
    # instructions (AVX2 / AVX-512: torch's cpu capability), never on the run: same threads, same capability and
    # the same packages give bit-identical files.
    os.environ.setdefault("OMP_NUM_THREADS", THREADS)
    import torch  # here, so that it reads OMP_NUM_THREADS like the steps do
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, CUDA {'yes' if torch.cuda.is_available() else 'no'}")
    t0 = time.time()
    run("synth.py", "--out", f"{out}/data", "--n-train", str(args.n_train), "--n-val", str(args.n_val),
        "--seed", "0")
    run("train.py", "--tiny", "--no-pretrained", "--perceptual-weight", "0", "--contrastive-weight", "0",
        "--data-dir", f"{out}/data", "--ckpt-dir", f"{out}/checkpoints", "--log-dir", f"{out}/logs",
        "--epochs", str(args.epochs), "--batch-size", str(BATCH), "--lr", "1e-3", "--warmup-steps", "50",
        "--log-every", "25", "--workers", "1")
    run("eval.py", f"{out}/checkpoints/best.pt", "--out", f"{out}/eval", "--export-latents", f"{out}/eval/latents.npy")
    run("eigenears.py", "--ckpt", f"{out}/checkpoints/best.pt", "--out", f"{out}/eigenears")
    # recognition from the latents: ears of new identities, 4 views each, none seen in training
    run("synth.py", "--out", f"{out}/identities", "--identities", str(args.identities), "--views", "4",
        "--seed", "1")
    run("eval.py", f"{out}/checkpoints/best.pt", "--data", f"{out}/identities/val_teacher.npy", "--identity",
        "--out", f"{out}/identity")
    print(f"\ndemo done in {(time.time() - t0) / 60:.1f} min: everything is in {out}/")


if __name__ == "__main__":
    safe_console()
    main()
