"""What every command shares (cli.py): each numeric flag refuses the values outside its range in one line, a console
that cannot encode a path does not make a command fail, and progress written to a log file is plain lines.

The console and log tests share one run of demo.py (synth, train, eval, eigenears, synth --identities, eval
--identity) at the smallest sizes, with a cp1252 console (PYTHONIOENCODING, as on Windows) and every path under a
folder named in Cyrillic and Chinese, which cp1252 cannot encode; its output goes to a file, as under nohup."""
import argparse
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tqdm
from PIL import Image

import bench
import cli
import data
import demo
import distill
import eigenears
import eval as evaluate
import synth
import train
from conftest import ROOT

PARSERS = {"train": (train.get_parser, []), "distill": (distill.get_parser, []), "eval": (evaluate.get_parser, ["ckpt.pt"]),
           "eigenears": (eigenears.get_parser, []), "data check": (data.get_parser, ["check", "x.npy"]),
           "data convert": (data.get_parser, ["convert", "photos", "--out", "o"]), "synth": (synth.get_parser, []),
           "bench": (bench.get_parser, []), "demo": (demo.get_parser, [])}
WEIGHTS = ["--kl-weight", "--perceptual-weight", "--ssim-weight", "--edge-weight", "--contrastive-weight"]
COUNTS = ["--epochs", "--batch-size", "--accum-steps", "--max-steps", "--save-every", "--log-every", "--max-nan"]
# (command, flag, values refused, values accepted): the edges of each flag's range
RANGES = [
    ("train", "--max-invalid", ["-0.01", "1.01", "nan"], ["0", "1"]),
    ("train", "--workers", ["-1", "1.5", "two"], ["0"]),
    ("train", "--input-size", ["0", "-16", "4097"], ["1", "1024", "4096"]),
    ("train", "--freeze-blocks", ["-1"], ["0"]),
    ("train", "--latent-dim", ["0"], ["1"]),
    *[("train", flag, ["-0.001", "inf", "nan"], ["0", "2.5"]) for flag in WEIGHTS],
    ("train", "--center-weight", ["0", "-1"], ["0.001"]),
    ("train", "--temperature", ["0", "-0.1"], ["0.01"]),
    *[("train", flag, ["0", "-1"], ["1"]) for flag in COUNTS],
    ("train", "--lr", ["0", "-0.0001", "inf", "nan", "1e-4x"], ["1e-08", "3e-4"]),
    ("train", "--encoder-lr-scale", ["-0.1"], ["0"]),
    ("train", "--min-lr-ratio", ["-0.1", "1.1"], ["0", "1"]),
    ("train", "--warmup-steps", ["-1"], ["0"]),
    ("train", "--weight-decay", ["-0.01"], ["0"]),
    ("train", "--grad-clip", ["-1", "nan"], ["0", "1"]),
    ("train", "--ema-decay", ["-0.1", "1", "1.5"], ["0", "0.999"]),
    ("train", "--seed", ["-1", str(2 ** 64)], ["0", str(2 ** 64 - 1)]),
    *[(c, "--batch-size", ["0", "-1"], ["1"]) for c in ("eval", "eigenears")],
    *[(c, "--workers", ["-1"], ["0"]) for c in ("eval", "eigenears")],
    ("eigenears", "--n-components", ["0"], ["1"]),
    ("data check", "--max-invalid", ["-0.1", "1.1"], ["0", "1"]),
    ("data convert", "--size", ["7", "0"], ["8"]),
    ("data convert", "--val-fraction", ["0", "1", "nan"], ["0.001", "0.999"]),
    ("data convert", "--seed", ["-1"], ["0"]),
    *[("synth", flag, ["0", "-1"], ["1"]) for flag in ("--n-train", "--n-val", "--identities", "--views",
                                                               "--val-identities")],
    ("synth", "--seed", ["-1"], ["0"]),
    ("synth", "--first-identity", ["-1"], ["0"]),
    ("train", "--images-per-identity", ["1", "0"], ["2"]),
    ("train", "--embed-dim", ["-1"], ["0"]),
    ("train", "--dense-dim", ["-1"], ["0"]),
    ("train", "--identity-dims", ["-1"], ["0"]),
    ("bench", "--sizes", ["0", "-16", "24"], ["16", "1024"]),
    ("bench", "--batch-sizes", ["0"], ["1"]),
    ("bench", "--steps", ["0"], ["1"]),
    ("bench", "--workers", ["-1"], ["0"]),
    *[(c, "--student-input-size", ["31", "0", "1025"], ["32", "1024"]) for c in ("distill", "bench")],
    ("demo", "--train-identities", ["3", "0"], ["4"]),
    *[("demo", flag, ["0"], ["1"]) for flag in ("--epochs", "--student-epochs")],
    ("demo", "--identities", ["1"], ["2"]),
]


def typed_actions(parser: argparse.ArgumentParser):
    """Every action of the parser and its subcommands that converts its value with a type function."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from typed_actions(sub)
        elif a.type is not None:
            yield a


@pytest.mark.parametrize("command", PARSERS)
def test_no_numeric_flag_is_a_plain_int_or_float(command):
    """Every numeric flag goes through a range-checked type (cli.int_range / float_range), and each one of the
    existing flags has its edges in RANGES."""
    make, _ = PARSERS[command]
    actions = list(typed_actions(make()))
    assert actions
    assert [a.option_strings for a in actions if a.type in (int, float)] == []
    tested = {flag for c, flag, _, _ in RANGES if c == command}
    assert tested <= {a.option_strings[0] for a in actions}


@pytest.mark.parametrize("command", PARSERS)
def test_help_states_each_default_at_most_once_and_never_as_none(command):
    """--help adds "(default: X)" to a flag only where its own text does not already say what the default is, and
    never "(default: None)" (cli.HelpFormatter): a flag's help never shows two defaults."""
    make, args = PARSERS[command]
    parser = make()
    for a in parser._actions:  # data.py's check / convert: the subcommand's own help
        if isinstance(a, argparse._SubParsersAction):
            parser = a.choices[args[0]]
    text = " ".join(parser.format_help().split())  # argparse's line breaks undone
    assert "(default: None)" not in text
    helps = [h for h in re.split(r"(?=\s-{1,2}[a-z])", text) if "default" in h]
    assert helps and [h for h in helps if h.count("default") > 1 and "(default: " in h] == []


@pytest.mark.parametrize("command, flag, refused, accepted", RANGES, ids=[f"{c}{f}" for c, f, _, _ in RANGES])
def test_a_value_outside_the_flags_range_is_one_error_line_at_parse_time(command, flag, refused, accepted, capsys):
    make, base = PARSERS[command]
    parser = make()
    dest = next(a.dest for a in typed_actions(parser) if flag in a.option_strings)
    for value in accepted:
        got = getattr(parser.parse_args([*base, flag, value]), dest)
        assert got == (pytest.approx([float(value)]) if isinstance(got, list) else pytest.approx(float(value)))
    for value in refused:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*base, flag, value])
        assert e.value.code == 2
        *usage, error = capsys.readouterr().err.strip().splitlines()
        assert all(line.startswith(("usage:", " ")) for line in usage), usage  # argparse's usage, then one line
        assert re.fullmatch(rf".*: error: argument {flag}: expected (an integer|a finite number) .+, got '?"
                            rf"{re.escape(value)}'?", error), error


def test_range_types_name_the_range_and_refuse_what_is_outside():
    assert cli.int_range(1)("7") == 7 and cli.float_range(0, lo_open=True)("1e-3") == 1e-3
    cases = [(cli.int_range(1), "0", "expected an integer >= 1, got 0"),
             (cli.int_range(16, multiple_of=16), "40", "expected an integer >= 16, a multiple of 16, got 40"),
             (cli.seed_int, "-5", f"expected an integer in [0, {2 ** 64 - 1}], got -5"),
             (cli.int_range(0), "3.0", "expected an integer >= 0, got '3.0'"),
             (cli.positive, "0", "expected a finite number > 0, got 0"),
             (cli.non_negative, "-inf", "expected a finite number >= 0, got -inf"),
             (cli.fraction, "nan", "expected a finite number in [0, 1], got nan"),
             (cli.float_range(0, 1, hi_open=True), "1", "expected a finite number in [0, 1), got 1"),
             (cli.float_range(hi=5), "inf", "expected a finite number <= 5, got inf")]
    for parse, text, message in cases:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            parse(text)


# -- progress ------------------------------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_progress_in_a_log_file_is_a_plain_line_at_start_every_interval_and_at_the_end(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(tqdm.std, "time", clock)  # tqdm's clock (and LogProgress's, through tqdm's self._time)
    monkeypatch.setattr(cli.LogProgress, "monitor_interval", 0)  # no monitor thread refreshing on the real clock
    f = io.StringIO()
    bar = cli.LogProgress(total=100, desc="epoch 0", file=f, interval=30)
    for _ in range(100):
        clock.t += 1.0  # one step per second
        bar.update(1)
        bar.set_postfix(loss=0.5)  # refreshes, as train.py's logging does: still at most a line per interval
    bar.close()
    text = f.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert [int(re.search(r" (\d+)/100 ", line).group(1)) for line in lines] == [0, 30, 60, 90, 100]
    assert lines[-1].startswith("epoch 0: 100% 100/100 [01:40<00:00") and lines[-1].endswith("loss=0.5]")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_tqdm_bar_on_a_terminal_and_plain_lines_elsewhere(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = cli.progress(range(3), desc="x")
    assert type(bar) is tqdm.tqdm
    list(bar)
    assert "\r" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = cli.progress(range(3), desc="x")
    assert isinstance(bar, cli.LogProgress)
    list(bar)
    first, last = sys.stderr.getvalue().split("\n")[:-1]  # two lines, each ended by a newline
    assert first == "x:   0% 0/3 [00:00<?, ?it/s]" and last.startswith("x: 100% 3/3 [00:00<00:00, ")


# -- a console that is not UTF-8 -----------------------------------------------------------------------------------

NON_LATIN = "ухо 耳"  # no character of it is in cp1252
ESCAPED = "\\u0443\\u0445\\u043e \\u8033"  # how it reaches a cp1252 console


def cp1252_env() -> dict[str, str]:
    return {**os.environ, "PYTHONIOENCODING": "cp1252", "HF_HUB_OFFLINE": "1"}


def test_safe_console_writes_what_the_encoding_lacks_as_escapes(monkeypatch):
    raw = io.BytesIO()
    console = io.TextIOWrapper(raw, encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", console)
    with pytest.raises(UnicodeEncodeError):
        print(NON_LATIN, flush=True)  # what every command did before
    cli.safe_console()
    print(f"path {NON_LATIN} é", flush=True)
    assert raw.getvalue().endswith(f"path {ESCAPED} \xe9\n".encode("cp1252"))  # é is in cp1252: kept


def test_the_demos_steps_run_this_repos_scripts_in_the_callers_folder(tmp_path, monkeypatch):
    """`python /repo/demo.py --out runs/a` from another folder writes into that folder's runs/a, as every other
    command's relative paths do: each step is the repo's script, run in the caller's folder."""
    calls = []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)) or
                        subprocess.CompletedProcess(cmd, 0))
    monkeypatch.chdir(tmp_path)
    demo.run("train.py", "--data-dir", "runs/a/data")
    [(cmd, kw)] = calls
    assert cmd == [sys.executable, str(ROOT / "train.py"), "--data-dir", "runs/a/data"] and "cwd" not in kw


@pytest.fixture(scope="module")
def demo_log(tmp_path_factory):
    """demo.py at the smallest sizes with a cp1252 console, its output (stdout and stderr) in a file."""
    out = tmp_path_factory.mktemp("demo") / NON_LATIN / "demo"
    out.parent.mkdir()
    log = out.parent / "demo.log"
    with open(log, "wb") as f:
        r = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--out", str(out), "--train-identities", "4",
                            "--epochs", "1", "--student-epochs", "1", "--identities", "2"],
                           stdout=f, stderr=subprocess.STDOUT, env=cp1252_env(), cwd=ROOT, timeout=600)
    return r.returncode, log.read_bytes().decode("cp1252"), out


def test_every_step_of_the_demo_succeeds_on_a_cp1252_console_with_a_non_latin_path(demo_log):
    """synth, train (which prints the folders of the finished run), eval, eigenears, eval --identity and the demo
    itself print paths that cp1252 cannot encode: each exits 0 and writes what it should."""
    returncode, text, out = demo_log
    assert returncode == 0, text[-3000:]
    assert "UnicodeEncodeError" not in text and "Traceback" not in text
    for step in ("synth.py", "train.py", "eval.py", "eigenears.py"):
        assert f"$ python {step} " in text
    assert "done: 1 steps, best val PSNR" in text and f"{ESCAPED}/demo/checkpoints" in text
    assert "done: 1 steps, best val agreement with the teacher" in text  # the student's distillation
    for path in ("checkpoints/best.pt", "eval/metrics.json", "eigenears/summary.json", "identity/metrics.json",
                 "checkpoints_student/best.pt", "identity_student/metrics.json"):
        assert (out / path).is_file(), path
    assert text.rstrip().endswith(f"everything is in {str(out).replace(NON_LATIN, ESCAPED)}/")


def test_progress_redirected_to_a_file_has_no_carriage_returns(demo_log):
    """The demo's log is lines: each loop's progress is a line at its start and one at its end (the demo's loops are
    shorter than the interval), not carriage-return frames."""
    _, text, _ = demo_log
    assert "\r" not in text
    lines = text.splitlines()
    for desc, total in (("epoch 0", 1), ("evaluate val_teacher.npy", 1), ("encode train_teacher.npy", 1),
                        ("decode val_teacher.npy", 1)):
        assert f"{desc}:   0% 0/{total} [00:00<?, ?it/s]" in lines, desc
        assert any(line.startswith(f"{desc}: 100% {total}/{total} [") for line in lines), desc
    assert max(map(len, lines)) < 1000


@pytest.mark.slow
def test_data_convert_and_check_succeed_on_a_cp1252_console_with_a_non_latin_path(tmp_path):
    src = tmp_path / NON_LATIN / f"subject é {NON_LATIN}"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), np.uint8)).save(src / f"ear {i}.png")
    (src / "notes.txt").write_text("not an image")  # reported as skipped, with its path, on stderr
    out = tmp_path / NON_LATIN / "data"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "data.py"), *args], capture_output=True, env=cp1252_env(),
                              cwd=ROOT, timeout=300)
    r = run("convert", str(src.parent), "--out", str(out), "--val-fraction", "0.34")
    assert r.returncode == 0, r.stderr.decode("cp1252")
    assert f"skipped subject \xe9 {ESCAPED}/notes.txt" in r.stderr.decode("cp1252")  # relative to the folder
    assert f"{ESCAPED}/data/train_teacher.npy" in r.stdout.decode("cp1252")
    r = run("check", str(out / "train_teacher.npy"))
    assert r.returncode == 0, r.stderr.decode("cp1252")
    report = r.stdout.decode("cp1252").splitlines()
    assert report[0] == f"file:     {tmp_path}/{ESCAPED}/data/train_teacher.npy"
    assert report[-1] == "verdict:  usable, 2 valid samples"
