"""The whole job on the built-in synthetic ears, CPU-sized (20-23 minutes on 2 quiet cores here):
synthesise identity-labelled ears -> train the tiny model (reconstruction + SupCon on the identities + a dense term
that asks its pyramid for positions) -> evaluate
it -> draw its eigenears -> probe its pyramid for landmarks and masks, beside the pixels and a random-init encoder ->
recognise new identities from its identity embedding, beside the raw pixels -> distil a student (a random
mobilenet_v3_small) from it and recognise the same identities with the student, beside the teacher, the pixels and
their speeds -> export the student to ONNX (fp32 and int8) and print its row of the edge table. Every artefact lands
in --out.

    python demo.py                     # writes demo/
    python demo.py --identity-table    # + the same training with the term off, label-free, and SupCon on all of
                                       #   mu instead of its first 128 entries: identity_table.md
Each step is the command a user would type; it is printed before it runs.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cli import HelpFormatter, int_range, positive_int, safe_console

ROOT = Path(__file__).resolve().parent
BATCH = 16  # the training batch: 4 identities x 4 views (SupCon's P x K)
VIEWS = 4  # images per synthetic identity, in training and in the new identities
CONTRASTIVE_WEIGHT = 0.1  # the contrastive term of the demo's training
# the dense term through a projection head: the probe's landmark NME 0.69x / 0.72x the random-init encoder's (0.82x /
# 0.87x without), rank-1 kept, +0.2 dB, ~13% more training time (two seeds: docs/probe.md, "Through a projection head");
# with every block of the random backbone trained (train.py's --no-pretrained default): 0.57x / 0.55x ("Every block")
DENSE = ("--dense-weight", "0.3", "--dense-dim", "32")
# 10 epochs: with every block trained, 8 lost up to 0.3 dB of PSNR against the teacher without the dense term; 10
# gain 1.0 dB over it, probe 0.54x / 0.52x, for ~3 more minutes (two seeds: docs/probe.md, "Ten epochs")
EPOCHS = 10
VAL_IDENTITIES = 100  # the val split, validated every epoch: 400 ears (2000 took a fifth of the demo's time)
STUDENT = ("--student-arch", "mobilenet_v3_small", "--student-input-size", "128")  # random trunk (--no-pretrained)
STUDENT_EPOCHS = 20  # default --student-epochs: 20 kept 0.96x the teacher's rank-1, 10 0.87x (docs/students.md)
THREADS = "2"  # CPU threads of every step, unless OMP_NUM_THREADS is set: the README's figures are for 2 threads


def run(*args: str) -> None:
    """Runs `python SCRIPT ARGS...`, the script from this repo, in the caller's folder (where --out is)."""
    cmd = [sys.executable, str(ROOT / args[0]), *args[1:]]
    print(f"\n$ python {shlex.join(args)}", flush=True)
    r = subprocess.run(cmd)
    if r.returncode != 0:
        sys.exit(f"error: step failed (exit {r.returncode}): python {shlex.join(args)}")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--out", default="demo", help="folder for data, checkpoints, logs, eval and eigenears")
    p.add_argument("--train-identities", type=int_range(BATCH // VIEWS), default=500,
                   help=f"synthetic training identities, {VIEWS} views each (val: {VAL_IDENTITIES} other "
                        "identities, or as many as train where fewer)")
    p.add_argument("--epochs", type=positive_int, default=EPOCHS, help="training epochs (one visit of every identity)")
    p.add_argument("--student-epochs", type=positive_int, default=STUDENT_EPOCHS,
                   help="epochs of the student's distillation on the teacher's training ears")
    p.add_argument("--identities", type=int_range(2), default=100,
                   help=f"new identities ({VIEWS} views each, none seen in training) that the embedding must recognise")
    p.add_argument("--identity-table", action="store_true",
                   help="also train the same model with the contrastive term off, label-free (NT-Xent) and SupCon on "
                        "all of mu, and write OUT/identity_table.md: rank-1 / EER of the four beside the raw pixels "
                        "(about 2.5x the time)")
    return p


def train(out: Path, name: str, epochs: int, *flags: str) -> None:
    """The demo's training run into out/checkpoints[_name], out/logs[_name], with the dense term; `flags` set the
    contrastive term."""
    suffix = f"_{name}" if name else ""
    run("train.py", "--tiny", "--no-pretrained", "--perceptual-weight", "0", *DENSE, *flags,
        "--data-dir", f"{out}/data", "--ckpt-dir", f"{out}/checkpoints{suffix}", "--log-dir", f"{out}/logs{suffix}",
        "--epochs", str(epochs), "--batch-size", str(BATCH), "--lr", "1e-3", "--warmup-steps", "50",
        "--log-every", "25", "--workers", "1")


def table(out: Path, runs: dict[str, str], identities: int) -> str:
    """identity_table.md: one row per trained variant (runs: label -> eval folder) and the centred raw pixels of the
    same images, from the metrics.json of each eval.py --identity on the new identities (PSNR, SSIM: of their
    reconstructions)."""
    rows = [f"| embedding of the {identities} new identities | rank-1 | rank-5 | EER | ROC AUC | PSNR (dB) | SSIM |",
            "|---|---|---|---|---|---|---|"]
    for label, folder in runs.items():
        m = json.loads((out / folder / "metrics.json").read_text())
        i = m["identity"]
        rows.append(f"| {label} | {i['rank1']:.3f} | {i['rank5']:.3f} | {i['eer']:.3f} | {i['roc_auc']:.3f} | "
                    f"{m['psnr']['mean']:.2f} | {m['ssim']['mean']:.3f} |")
    b = m["identity_pixels"]
    rows.append(f"| raw pixels, centred on the set mean | {b['rank1']:.3f} | {b['rank5']:.3f} | {b['eer']:.3f} | "
                f"{b['roc_auc']:.3f} | - | - |")
    return "\n".join(rows) + "\n"


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
    # identity-labelled training ears (synth.py's identity column): the contrastive term is SupCon on P x K batches
    run("synth.py", "--out", f"{out}/data", "--identities", str(args.train_identities), "--views", str(VIEWS),
        "--val-identities", str(min(VAL_IDENTITIES, args.train_identities)), "--seed", "0")
    train(out, "", args.epochs, "--contrastive-weight", str(CONTRASTIVE_WEIGHT), "--contrastive", "supcon")
    run("eval.py", f"{out}/checkpoints/best.pt", "--out", f"{out}/eval", "--export-latents", f"{out}/eval/latents.npy")
    run("eigenears.py", "--ckpt", f"{out}/checkpoints/best.pt", "--out", f"{out}/eigenears")
    # what its pyramid knows of the anatomy: landmark and mask probes beside the pixels and a random-init encoder
    run("probe.py", f"{out}/checkpoints/best.pt", "--out", f"{out}/probe")
    # recognition from the identity embedding: ears of new identities, 4 views each, none seen in training
    run("synth.py", "--out", f"{out}/identities", "--identities", str(args.identities), "--views", str(VIEWS),
        "--seed", "1", "--first-identity", str(2 * args.train_identities))  # numbers apart from training's
    new_ids = ["--data", f"{out}/identities/val_teacher.npy", "--identity"]
    run("eval.py", f"{out}/checkpoints/best.pt", *new_ids, "--out", f"{out}/identity")
    # a student learns the teacher's identity embedding and mu on the same ears, then recognises the new identities
    run("distill.py", "--teacher", f"{out}/checkpoints/best.pt", "--no-pretrained", *STUDENT, "--data-dir",
        f"{out}/data", "--ckpt-dir", f"{out}/checkpoints_student", "--log-dir", f"{out}/logs_student", "--epochs",
        str(args.student_epochs), "--batch-size", str(BATCH), "--lr", "1e-3", "--encoder-lr-scale", "1",
        "--warmup-steps", "50", "--log-every", "25", "--workers", "1")
    run("eval.py", f"{out}/checkpoints_student/best.pt", *new_ids, "--out", f"{out}/identity_student")
    # the student as a phone runs it: ONNX fp32 and int8 in student_onnx/<arch>/, its row of the edge table
    run("onnx_export.py", f"{out}/checkpoints_student/best.pt", "--table", "--out", f"{out}/student_onnx", "--data",
        f"{out}/identities/val_teacher.npy", "--calib", f"{out}/data/train_teacher.npy", "--runs", "50")
    if args.identity_table:  # the same training with the term off, label-free, and on all of mu, on the same data
        weight = str(CONTRASTIVE_WEIGHT)
        train(out, "off", args.epochs, "--contrastive-weight", "0", "--identity-dims", "0")
        train(out, "ntxent", args.epochs, "--contrastive-weight", weight, "--contrastive", "nt-xent")
        train(out, "allmu", args.epochs, "--contrastive-weight", weight, "--contrastive", "supcon",
              "--identity-dims", "0")
        for name in ("off", "ntxent", "allmu"):
            run("eval.py", f"{out}/checkpoints_{name}/best.pt", *new_ids, "--out", f"{out}/identity_{name}")
        text = table(out, {"contrastive term off (all of mu)": "identity_off",
                           f"NT-Xent (label-free; views rotated and shifted), weight {weight}, first 128 entries of "
                           f"mu": "identity_ntxent",
                           f"SupCon (identity labels), weight {weight}, all of mu": "identity_allmu",
                           f"SupCon (identity labels), weight {weight}, first 128 entries of mu (the demo's "
                           f"teacher)": "identity"}, args.identities)
        (out / "identity_table.md").write_text(text)
        print(f"\n{text}")
    print(f"\ndemo done in {(time.time() - t0) / 60:.1f} min: everything is in {out}/")


if __name__ == "__main__":
    safe_console()
    main()
