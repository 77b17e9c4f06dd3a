"""Distillation through distill.py and eval.py: a student run moves towards its teacher, resumes bit-exactly and
refuses another teacher; each command refuses the other's flags and runs; eval.py on a student gives
its agreement with the teacher image by image, both speeds, and recognition beside the teacher's and the pixels'."""
import csv
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval as ev  # noqa: E402
import synth  # noqa: E402
import distill  # noqa: E402
import train  # noqa: E402
from checkpoints import load_model, weights_sha256  # noqa: E402
from conftest import TINY_LATENT  # noqa: E402
from data import EarDataset, read_identities, to_float  # noqa: E402
from errors import CheckpointError, ConfigError  # noqa: E402
from recognition import recognition_metrics  # noqa: E402
from student import Student, StudentConfig, load_student, teacher_targets  # noqa: E402


def student_args(teacher: Path, data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """A CPU-sized student run: a random mobilenet_v3_small at input 64, one epoch of 8 steps on synth_dir."""
    return ["--teacher", str(teacher), "--no-pretrained", "--student-input-size", "64", "--data-dir", str(data_dir),
            "--ckpt-dir", str(run_dir / "checkpoints"), "--log-dir", str(run_dir / "logs"), "--batch-size", "8",
            "--workers", "0", "--warmup-steps", "2", "--log-every", "1", "--lr", "3e-3", "--encoder-lr-scale", "1",
            "--epochs", "1", *extra]


def test_a_student_run_moves_towards_its_teacher_resumes_bit_exactly_and_refuses_another_teacher(tiny_run, tmp_path,
                                                                                                  capsys):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(tiny_run.best, teacher)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    distill.main(student_args(teacher, tiny_run.data_dir, whole))
    log = capsys.readouterr().out
    before = float(re.search(r"Sanity check \(2 val batches\):.* agreement (\S+)", log).group(1))  # all 16 val images
    rows = [r for r in csv.DictReader(open(whole / "logs" / "metrics.csv")) if r["split"] == "val"]
    after = float(rows[-1]["agreement"])
    assert after > before + 0.1, (before, after)
    ds = EarDataset(tiny_run.data_dir / "val_teacher.npy")
    with torch.no_grad():  # 8 steps: in eval mode the images still get distinct embeddings (precise BN), not one
        e = load_student(whole / "checkpoints" / "best.pt")(to_float(torch.stack([ds[i][0] for i in range(16)])))
    cosines = (e["embed"] @ e["embed"].T)[~torch.eye(16, dtype=torch.bool)]
    assert cosines.min() < 0.9, cosines.min()

    distill.main(student_args(teacher, tiny_run.data_dir, cut, "--max-steps", "3"))
    resume = ["--resume", "--ckpt-dir", str(cut / "checkpoints"), "--log-dir", str(cut / "logs"), "--max-steps", "8"]
    changed = torch.load(teacher, weights_only=True)
    for weights in ("model", "ema"):
        if weights in changed:
            name = next(iter(changed[weights]))
            changed[weights][name] = changed[weights][name] + 1e-3
    torch.save(changed, teacher)
    with pytest.raises(CheckpointError, match="not those .* was distilled from"):
        distill.main(resume)

    distill.main([*resume, "--teacher", str(tiny_run.best)])  # the same weights at another path (a moved teacher)
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (whole, cut))
    assert a["step"] == b["step"] == 8 and a["teacher_sha256"] == b["teacher_sha256"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_hint_run_moves_its_maps_towards_the_teachers_resumes_bit_exactly_and_deploys_without_regressors(
        tiny_run, tmp_path):
    """FitNets hints (--hint-weight): the hint MSE falls over 8 steps, the run resumes bit-exactly, and the checkpoint
    loads as a plain Student (its regressors left out) that computes what the trained model's trunk and head do."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    distill.main(student_args(tiny_run.best, tiny_run.data_dir, whole, "--hint-weight", "1"))
    hint = [float(r["hint"]) for r in csv.DictReader(open(whole / "logs" / "metrics.csv")) if r["split"] == "train"]
    assert len(hint) == 8 and np.mean(hint[-2:]) < 0.8 * hint[0], hint

    distill.main(student_args(tiny_run.best, tiny_run.data_dir, cut, "--hint-weight", "1", "--max-steps", "3"))
    distill.main(["--resume", "--ckpt-dir", str(cut / "checkpoints"), "--log-dir", str(cut / "logs"),
                  "--max-steps", "8", "--teacher", str(tiny_run.best)])
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (whole, cut))
    assert a["step"] == b["step"] == 8 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    student = load_student(whole / "checkpoints" / "last.pt")
    plain = {k: v for k, v in a["model"].items() if not k.startswith("hint.")}
    assert {k for k in a["model"] if k.startswith("hint.")} and student.state_dict().keys() == plain.keys()
    assert type(student) is Student and all(torch.equal(student.state_dict()[k], v) for k, v in plain.items())


@pytest.mark.parametrize("argv, named", [
    (["--no-pretrained"], "--teacher PATH is needed: the trained teacher"),
    (["--teacher", "t.pt", "--no-pretrained", "--student-weights", "w.pth"], "--student-weights w.pth with "
                                                                             "--no-pretrained"),
    (["--teacher", "t.pt", "--batch-size", "1"], "--batch-size 1: a student's BatchNorm layers need 2 images"),
])
def test_a_student_run_refuses_flags_that_contradict_each_other(argv, named, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(named)):
        distill.main([*argv, "--ckpt-dir", str(tmp_path / "c"), "--log-dir", str(tmp_path / "l")])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("main, argv, unknown", [
    (distill.main, ["--teacher", "t.pt", "--tiny"], "--tiny"),
    (distill.main, ["--teacher", "t.pt", "--kl-weight", "0"], "--kl-weight 0"),
    (train.main, ["--student-arch", "resnet18"], "--student-arch resnet18"),
    (train.main, ["--teacher", "t.pt"], "--teacher t.pt")])
def test_each_command_has_only_its_own_flags(main, argv, unknown, tmp_path, capsys):
    """train.py trains a teacher, distill.py a student: a flag of the other command is argparse's usage error."""
    with pytest.raises(SystemExit) as e:
        main([*argv, "--ckpt-dir", str(tmp_path / "c"), "--log-dir", str(tmp_path / "l")])
    assert e.value.code == 2 and f"unrecognized arguments: {unknown}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_each_command_resumes_only_its_own_runs(tiny_run, tmp_path):
    """A teacher's last.pt given to distill.py --resume, or a student's to train.py --resume, is refused naming the
    command that continues it."""
    with pytest.raises(CheckpointError, match=re.escape(f"{tiny_run.last}: a teacher's run, not a student's; "
                                                        f"continue it with train.py --resume")):
        distill.main(["--resume", str(tiny_run.last), "--ckpt-dir", str(tmp_path / "s"), "--log-dir",
                      str(tmp_path / "sl")])
    student = tmp_path / "student.pt"
    ckpt = torch.load(tiny_run.last, weights_only=True)
    ckpt["student_config"] = asdict(StudentConfig(pretrained=False))
    torch.save(ckpt, student)
    with pytest.raises(CheckpointError, match=re.escape(f"{student}: a student's run; continue it with distill.py "
                                                        f"--resume")):
        train.main(["--resume", str(student), "--ckpt-dir", str(tmp_path / "t"), "--log-dir", str(tmp_path / "tl")])
    del ckpt["student_config"], ckpt["model_config"]  # a landmark model's run holds no model_config
    ckpt["landmark_config"] = {}
    torch.save(ckpt, landmarks := tmp_path / "landmarks.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"{landmarks}: a landmark model's run; continue it with "
                                                        f"landmarker.py --resume")):
        train.main(["--resume", str(landmarks), "--ckpt-dir", str(tmp_path / "t"), "--log-dir", str(tmp_path / "tl")])


def test_a_teacher_loader_refuses_a_student_and_a_student_loader_a_teacher(tiny_run, tmp_path):
    cfg = StudentConfig(pretrained=False, embed_dim=8, latent_dim=TINY_LATENT, head_dim=16, input_size=32)
    path = tmp_path / "student.pt"
    torch.save({"model": Student(cfg).state_dict(), "student_config": asdict(cfg), "run_config": {}}, path)
    with pytest.raises(CheckpointError, match="a student's checkpoint .* not a teacher's"):
        load_model(path)
    with pytest.raises(CheckpointError, match="a teacher's checkpoint, not a student's"):
        load_student(tiny_run.best)
    assert torch.equal(load_student(path).to_mu.weight, torch.load(path, weights_only=True)["model"]["to_mu.weight"])


@pytest.fixture(scope="module")
def student_eval(tiny_run, tmp_path_factory) -> SimpleNamespace:
    """A random student of tiny_run's teacher saved as a distill.py checkpoint, and eval.main with --identity
    --export on 6 synthetic identities x 3 views."""
    d = tmp_path_factory.mktemp("student_eval")
    synth.write_synthetic_identities(d / "ids", k=6, views=3, seed=3, first_id=100)
    teacher, _ = load_model(tiny_run.best)
    torch.manual_seed(0)
    cfg = StudentConfig(pretrained=False, embed_dim=teacher.cfg.embedding_dim,
                        latent_dim=teacher.cfg.latent_dim, head_dim=32, input_size=64)
    student = Student(cfg).eval()
    ckpt = d / "student.pt"
    torch.save({"model": student.state_dict(), "student_config": asdict(cfg), "step": 0,
                "teacher_sha256": weights_sha256(teacher),
                "run_config": {"teacher": str(tiny_run.best), "data_dir": str(tiny_run.data_dir)}}, ckpt)
    data = d / "ids" / "val_teacher.npy"
    common = ["--data", str(data), "--identity", "--workers", "0", "--device", "cpu", "--batch-size", "8"]
    metrics = ev.main([str(ckpt), *common, "--out", str(d / "out"), "--export", str(d / "exported")])
    return SimpleNamespace(d=d, ckpt=ckpt, data=data, common=common, metrics=metrics, student=student,
                           teacher=teacher)


def test_student_eval_agreement_is_the_cosine_of_the_two_embeddings_image_by_image(student_eval):
    s = student_eval
    ds = EarDataset(s.data)
    x = to_float(torch.stack([ds[i][0] for i in range(len(ds))]))
    with torch.no_grad():
        want = F.cosine_similarity(s.student(x)["embed"], teacher_targets(s.teacher, x)["embed"]).numpy()
    rows = list(csv.DictReader(open(s.d / "out" / "per_image.csv")))
    got = np.array([float(r["agreement"]) for r in rows])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [int(r["index"]) for r in rows] == list(range(len(ds)))
    assert s.metrics["agreement"]["mean"] == pytest.approx(float(got.mean()))
    labels = read_identities(s.data, ds)
    with torch.no_grad():
        student_embed, teacher_embed = s.student(x)["embed"].numpy(), s.teacher.embed(x).numpy()
    for key, embedding in (("identity", student_embed), ("identity_teacher", teacher_embed)):
        want_id = recognition_metrics(embedding, labels)
        assert s.metrics[key]["rank1"] == pytest.approx(want_id["rank1"]) and s.metrics[key]["eer"] == pytest.approx(
            want_id["eer"], abs=1e-6), key
    assert s.metrics["identity_pixels"]["n_identities"] == 6
    ratio = s.metrics["identity"]["rank1"] / s.metrics["identity_teacher"]["rank1"]
    assert f"student / teacher: rank-1 {ratio:.2f}x" in ev.student_report(s.metrics)
    speed = s.metrics["speed"]
    assert speed["student_images_per_s"] > 0 and speed["teacher_images_per_s"] > 0
    assert speed["ratio"] == pytest.approx(speed["student_images_per_s"] / speed["teacher_images_per_s"])


def test_a_students_export_loads_with_the_same_outputs_and_evaluates_alike_given_its_teacher(student_eval, tiny_run,
                                                                                             capsys):
    s = student_eval
    loaded = Student.from_pretrained(s.d / "exported")
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["embed"], s.student(x)["embed"], rtol=0, atol=0)
    assert "agreement with the teacher" in (s.d / "exported" / "README.md").read_text()
    with pytest.raises(CheckpointError, match="does not name its teacher: give --teacher"):
        ev.main([str(s.d / "exported"), *s.common, "--out", str(s.d / "again")])
    again = ev.main([str(s.d / "exported"), *s.common, "--out", str(s.d / "again"), "--teacher", str(tiny_run.best)])
    assert again["agreement"] == s.metrics["agreement"] and again["identity"] == s.metrics["identity"]
    with pytest.raises(SystemExit) as exit_info:  # a student has no reconstructions
        ev.main([str(s.ckpt), *s.common, "--out", str(s.d / "lp"), "--lpips"])
    assert exit_info.value.code == 2 and "--lpips measures reconstructions" in capsys.readouterr().err


def test_student_eval_refuses_another_teacher_and_an_export_over_a_saved_model(student_eval, tiny_run, tmp_path,
                                                                               capsys):
    s = student_eval
    other = tmp_path / "other.pt"
    changed = torch.load(tiny_run.best, weights_only=True)
    for weights in ("model", "ema"):
        if weights in changed:
            name = next(iter(changed[weights]))
            changed[weights][name] = changed[weights][name] + 1e-3
    torch.save(changed, other)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(other))}: not the teacher .* was distilled from"):
        ev.main([str(s.ckpt), *s.common, "--out", str(tmp_path / "o"), "--teacher", str(other)])
    before = (s.d / "exported" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        ev.main([str(s.ckpt), *s.common, "--out", str(tmp_path / "o"), "--export", str(s.d / "exported")])
    assert exit_info.value.code == 2 and "holds config.json, model.safetensors, README.md already" in \
        capsys.readouterr().err
    assert (s.d / "exported" / "model.safetensors").read_bytes() == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my notes\n")  # a user's folder: its README is never replaced
    with pytest.raises(SystemExit):
        ev.main([str(s.ckpt), *s.common, "--out", str(tmp_path / "o2"), "--export", str(tmp_path / "mine")])
    assert "holds README.md already" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["README.md"]
    assert (tmp_path / "mine" / "README.md").read_text() == "my notes\n"
    assert not (tmp_path / "o").exists()
    moved = torch.load(s.ckpt, weights_only=True)  # its teacher moved since distill.py ran
    moved["run_config"]["teacher"] = str(tmp_path / "gone" / "best.pt")
    torch.save(moved, tmp_path / "student.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'gone' / 'best.pt'}: no such file or folder: "
                                                        f"the teacher {tmp_path / 'student.pt'} was distilled from "
                                                        f"(its run recorded this path); give its new place with "
                                                        f"--teacher")):
        ev.main([str(tmp_path / "student.pt"), *s.common, "--out", str(tmp_path / "o3")])


def test_precise_bn_equals_torchs_update_bn_and_leaves_the_model_as_it_was():
    """distill.precise_bn against the reference torch.optim.swa_utils.update_bn: the same exact averages."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.01), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2))
    batches = [torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8) for _ in range(3)]
    reference = __import__("copy").deepcopy(model)
    torch.optim.swa_utils.update_bn([to_float(x) for x in batches], reference)
    model.train()
    distill.precise_bn(model, [(x, None) for x in batches], torch.device("cpu"), torch.autocast("cpu", enabled=False))
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert model.training and model[1].momentum == 0.01 and model[4].momentum == 0.1
    assert not torch.equal(model[1].running_mean, torch.zeros(4))
