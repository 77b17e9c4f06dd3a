"""Tests for the student side (issue 20): losses.DistillLoss against a hand computation, a student that moves towards
a fixed teacher in a few steps, and sharing through huggingface_hub's mixin (student.Student and model.EarVAE):
from_pretrained gives back the same outputs, today's export layout loads, a hub id offline fails in one line, and
a pickle in a saved folder never runs."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import TINY_LATENT, Hostile  # noqa: E402
from losses import DistillLoss, rkd_distance  # noqa: E402
from checkpoints import export_model  # noqa: E402
from errors import CheckpointError, WeightsUnavailableError  # noqa: E402
from model import EarVAE, build_model, count, tiny_config  # noqa: E402
from student import ARCHS, STUDENT_FORMAT, Student, StudentConfig  # noqa: E402

EMBED = 16  # the tests' embedding size


def tiny_teacher(seed: int = 0) -> EarVAE:
    torch.manual_seed(seed)
    return build_model(tiny_config(latent_dim=TINY_LATENT, embed_dim=EMBED)).eval()  # an embedding head of EMBED


def tiny_student(seed: int = 0, **overrides) -> Student:
    """A random mobilenet_v3_small student at input 64, sized for tiny_teacher."""
    torch.manual_seed(seed)
    kw = dict(arch="mobilenet_v3_small", pretrained=False, embed_dim=EMBED, latent_dim=TINY_LATENT, head_dim=32,
              input_size=64)
    return Student(StudentConfig(**{**kw, **overrides}))


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def teacher_targets(teacher: EarVAE, x: torch.Tensor) -> dict:
    """The teacher's identity embedding (EarVAE.embed) and mu, through its public methods."""
    return {"embed": teacher.embed(x), "mu": teacher.encode(x)[0]}  # (B, EMBED), (B, latent)


# ---------------------------------------------------------------------------------------------- the loss

def test_distill_loss_matches_a_hand_computation():
    loss = DistillLoss(embed_cosine=1.0, embed_l2=2.0, mu_cosine=1.0, mu_l2=0.5)
    student = {"embed": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "mu": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    teacher = {"embed": torch.tensor([[1.0, 0.0], [1.0, 0.0]]), "mu": torch.tensor([[1.0, 0.0], [0.0, 4.0]])}
    total, logs = loss(student, teacher)
    # embed: cosines 1 and 0 -> 1 - 0.5; squared differences 0, 0, 1, 1 -> 0.5
    # mu: cosines 1 / sqrt(5) and 16 / 20 -> 1 - mean; squared differences 0, 4, 9, 0 -> 3.25
    mu_cosine = 1 - (1 / 5 ** 0.5 + 0.8) / 2
    expected = {"embed_cosine": 0.5, "embed_l2": 0.5, "mu_cosine": mu_cosine, "mu_l2": 3.25}
    for name, value in expected.items():
        assert logs[name].item() == pytest.approx(value, rel=1e-6), name
    assert total.item() == pytest.approx(0.5 + 2 * 0.5 + mu_cosine + 0.5 * 3.25, rel=1e-6)
    assert logs["loss"].item() == pytest.approx(total.item())


def test_distill_loss_terms_off_are_not_computed_and_missing_outputs_are_named():
    total, logs = DistillLoss(embed_cosine=0.0)({"mu": torch.ones(2, 3)}, {"mu": torch.ones(2, 3)})
    assert set(logs) == {"loss", "mu_cosine", "mu_l2"} and total.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="'embed': missing from the teacher's outputs"):
        DistillLoss()({"embed": torch.ones(2, 3), "mu": torch.ones(2, 3)}, {"mu": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="nothing to learn"):
        DistillLoss(embed_cosine=0.0, mu_cosine=0.0, mu_l2=0.0)


def reference_rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD's distance loss as the authors wrote it (lenscloth/RKD, metric/loss.py RkdDistance with metric/utils.py
    pdist): distances from the expanded squared norms, means over the positive entries. Used only by the tests."""
    def pdist(e):
        sq = e.pow(2).sum(dim=1)
        d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt().clone()
        d[range(len(e)), range(len(e))] = 0
        return d
    t_d = pdist(teacher)
    t_d = t_d / t_d[t_d > 0].mean()
    d = pdist(student)
    d = d / d[d > 0].mean()
    return F.smooth_l1_loss(d, t_d)


def test_rkd_distance_matches_the_authors_formulation_is_scale_free_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(12, 8, generator=g, dtype=torch.float64), torch.randn(12, 8, generator=g, dtype=torch.float64)
    ours = rkd_distance(s, t)
    assert ours.item() == pytest.approx(reference_rkd_distance(s, t).item(), rel=1e-6) and ours.item() > 0.01
    assert rkd_distance(3 * t + 1, t).item() == pytest.approx(0.0, abs=1e-6)  # the same geometry at another scale
    leaf = s.float().requires_grad_()
    rkd_distance(leaf, t.float()).backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    total, logs = DistillLoss(embed_cosine=0.0, mu_cosine=0.0, mu_l2=0.0, embed_rkd=2.0)({"embed": s}, {"embed": t})
    assert set(logs) == {"loss", "embed_rkd"} and total.item() == pytest.approx(2 * ours.item(), rel=1e-6)
    with pytest.raises(ValueError, match="2 or more"):
        rkd_distance(s[:1], t[:1])
    with pytest.raises(ValueError, match="the same point"):
        rkd_distance(s[:3], torch.ones(3, 8))


# ---------------------------------------------------------------------------------------------- learning

def test_student_moves_towards_a_fixed_teacher_in_a_few_steps():
    teacher, x = tiny_teacher(), images()
    target = teacher_targets(teacher, x)
    student = tiny_student()
    loss = DistillLoss()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)

    def measure() -> tuple[float, dict]:
        with torch.no_grad():
            out = student(x)
            return F.cosine_similarity(out["embed"], target["embed"]).mean().item(), loss(out, target)[1]

    cosine_before, logs_before = measure()
    for _ in range(20):
        total, _ = loss(student(x), target)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    cosine_after, logs_after = measure()
    assert cosine_after > cosine_before + 0.2, (cosine_before, cosine_after)
    for name in ("mu_cosine", "mu_l2"):
        assert logs_after[name] < 0.7 * logs_before[name], (name, logs_before[name], logs_after[name])


# ---------------------------------------------------------------------------------------------- the students

def test_every_student_arch_stays_within_12m_parameters_and_fits_a_sam_teacher():
    for arch in ARCHS:
        student = Student(StudentConfig(arch=arch, pretrained=False))  # the default sizes: SAM ViT-B's latent 1024
        total, trainable = count(student)
        assert total == trainable <= 12_000_000, (arch, total)
        out = student.eval()(images(2))
        assert out["embed"].shape == (2, 128) and out["mu"].shape == (2, 1024)
        torch.testing.assert_close(out["embed"].norm(dim=1), torch.ones(2))


def test_student_imagenet_weights_offline_raise_one_actionable_line(offline_torch_hub):
    with pytest.raises(WeightsUnavailableError) as info:
        Student(StudentConfig(arch="mobilenet_v3_small"))
    message = str(info.value)
    assert "\n" not in message and "mobilenet_v3_small" in message
    assert str(offline_torch_hub / "hub" / "checkpoints") in message and "pretrained=False" in message


def test_student_loads_a_local_torchvision_state_dict(tmp_path):
    from safetensors.torch import save_file
    from torchvision import models
    torch.manual_seed(3)
    reference = models.mobilenet_v3_small()
    other = tmp_path / "resnet18.pth"
    torch.save(models.resnet18().state_dict(), other)
    with pytest.raises(WeightsUnavailableError, match="mobilenet_v3_small weights.*local file.*resnet18.pth"):
        Student(StudentConfig(weights=str(other)))  # another arch's file: refused, never random
    path = tmp_path / "mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    student = Student(StudentConfig(weights=str(path), embed_dim=EMBED, latent_dim=TINY_LATENT))
    torch.testing.assert_close(student.trunk.state_dict(), reference.features.state_dict(), rtol=0, atol=0)
    student.save_pretrained(tmp_path / "saved")
    path.unlink()  # loading a saved student never reads its starting weights again
    loaded = Student.from_pretrained(tmp_path / "saved")
    assert loaded.cfg == student.cfg and loaded.cfg.pretrained and loaded.cfg.weights == str(path)
    assert f"initialised from `{path}`" in (tmp_path / "saved" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- sharing

def assert_same_outputs(a: dict, b: dict) -> None:
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0, msg=k)


def test_from_pretrained_of_a_saved_teacher_and_student_gives_the_same_outputs(tmp_path):
    x = images(2)
    teacher, student = tiny_teacher(), tiny_student().eval()
    teacher.save_pretrained(tmp_path / "teacher", model_card_kwargs={"metrics": {"psnr": 30.5}})
    student.save_pretrained(tmp_path / "student", model_card_kwargs={"metrics": {"rank1": 0.9125}})
    for folder in ("teacher", "student"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["README.md", "config.json",
                                                                         "model.safetensors"]
    loaded_teacher = EarVAE.from_pretrained(tmp_path / "teacher")
    loaded_student = Student.from_pretrained(str(tmp_path / "student"))
    assert not loaded_teacher.training and not loaded_student.training
    assert loaded_student.cfg == student.cfg
    with torch.no_grad():
        t, s = teacher(x), student(x)
        assert_same_outputs({k: t[k] for k in ("recon", "mu")}, loaded_teacher(x))
        assert_same_outputs({k: s[k] for k in ("embed", "mu")}, loaded_student(x))
    card = (tmp_path / "student" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: ear-teacher\n") and "pytorch_model_hub_mixin" in card
    assert "| rank1 | 0.9125 |" in card and "| arch | `mobilenet_v3_small` |" in card
    assert "| psnr | 30.5 |" in (tmp_path / "teacher" / "README.md").read_text()
    assert json.loads((tmp_path / "student" / "config.json").read_text())["format"] == STUDENT_FORMAT
    # today's export layout is the same layout: an export_model folder loads through the mixin as it is
    export_model(teacher, tmp_path / "export")
    with torch.no_grad():
        assert_same_outputs({k: t[k] for k in ("recon", "mu")}, EarVAE.from_pretrained(tmp_path / "export")(x))
    # a teacher's folder is not a student's
    with pytest.raises(CheckpointError, match=f"format 'ear-teacher-vae/1', expected '{STUDENT_FORMAT}'"):
        Student.from_pretrained(tmp_path / "teacher")


@pytest.mark.parametrize("cls", [EarVAE, Student])
def test_a_hub_id_offline_fails_in_one_line_saying_what_was_tried(cls, tmp_path):
    with pytest.raises(CheckpointError) as info:
        cls.from_pretrained("someone/ear-model")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("someone/ear-model: no such folder, and as a Hugging Face hub id")
    assert "HF_HUB_OFFLINE=1" in message and "`hf download someone/ear-model`" in message
    with pytest.raises(CheckpointError, match="not a Hugging Face hub id either"):
        cls.from_pretrained(str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="a file; from_pretrained takes a save_pretrained folder"):
        cls.from_pretrained(tmp_path / "best.pt")


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_a_pickle_placed_in_a_saved_folder_never_runs(which, tmp_path):
    model, cls = (tiny_teacher(), EarVAE) if which == "teacher" else (tiny_student(), Student)
    folder, marker = tmp_path / which, tmp_path / "MARKER"
    model.save_pretrained(folder)
    torch.save(Hostile(marker), folder / "pytorch_model.bin")  # the mixin's pickle fallback name
    cls.from_pretrained(folder)  # loads from model.safetensors; the pickle is never opened
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"{folder / 'model.safetensors'}: missing"):
        cls.from_pretrained(folder)  # no fallback to the pickle
    torch.save({"model": Hostile(marker)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        cls.from_pretrained(folder)
    assert not marker.exists()


def test_a_failed_save_leaves_the_earlier_save_whole(tmp_path, monkeypatch):
    student = tiny_student()
    student.save_pretrained(tmp_path / "s")
    before = {f.name: f.read_bytes() for f in (tmp_path / "s").iterdir()}

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Student, "hub_files", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_student(seed=1).save_pretrained(tmp_path / "s")
    assert {f.name: f.read_bytes() for f in (tmp_path / "s").iterdir()} == before
    with pytest.raises(ValueError, match="config must be None"):
        student.save_pretrained(tmp_path / "other", config={"a": 1})
    assert not (tmp_path / "other").exists()


def test_push_to_hub_uploads_what_save_pretrained_writes(tmp_path, monkeypatch):
    """The mixin's push_to_hub, with its HfApi replaced by a recorder: one repo, one folder of the three files."""
    import huggingface_hub.hub_mixin
    uploaded = {}

    class RecordingApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()}, repo_id=repo_id)
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", RecordingApi)
    student = tiny_student()
    url = student.push_to_hub("someone/ear-student", model_card_kwargs={"metrics": {"rank1": 0.5}})
    assert url == "https://huggingface.co/someone/ear-student/commit/0"
    assert sorted(uploaded) == ["README.md", "config.json", "model.safetensors", "repo_id"]
    assert uploaded["repo_id"] == "someone/ear-student" and b"| rank1 | 0.5 |" in uploaded["README.md"]
    (tmp_path / "pulled").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "pulled" / name).write_bytes(uploaded[name])
    x = images(2)
    with torch.no_grad():
        expected = {k: student.eval()(x)[k] for k in ("embed", "mu")}
        assert_same_outputs(expected, Student.from_pretrained(tmp_path / "pulled")(x))


def test_the_smallest_student_arch_has_at_most_1m_parameters_with_its_head():
    total, _ = count(Student(StudentConfig(arch="shufflenet_v2_x0_5", pretrained=False)))  # SAM ViT-B's latent 1024
    assert total <= 1_000_000, total
