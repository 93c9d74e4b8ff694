"""The command line itself: every argument argparse refuses is one line naming the argument (exit 2, no
usage block, no traceback), a 0 or an empty string is refused instead of being read as "the default", and
nothing an earlier command wrote is touched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench.cli import main
from workbench.formats import dictionary_learning as dl
from workbench.sae import BatchTopKSAE

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "recipes" / "demo.yaml")


def refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "usage:" not in captured.err, captured.err
    return captured.err


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def sae_folder(tmp_path) -> Path:
    """A small dictionary_learning BatchTopK SAE folder, written by the workbench's own format code."""
    torch.manual_seed(0)
    sae = BatchTopKSAE(16, 64, 4)
    with torch.no_grad():
        sae.threshold.fill_(0.25)
    trainer = dl.trainer_section(sae, lr=1e-3, steps=100, auxk_alpha=1 / 32, warmup_steps=10, decay_start=80,
                                 threshold_beta=0.999, threshold_start_step=10, seed=0, device="cpu", layer=2,
                                 lm_name="embedded:tiny-qwen3", group_fractions=None, group_weights=None)
    folder = tmp_path / "run" / "resid_post_layer_2" / "trainer_0"
    dl.save_folder(sae, folder, {"trainer": trainer, "buffer": dl.buffer_section(16, 128, 8, 4, 256, "cpu")},
                   {"l0": 4.0})
    return folder


@pytest.mark.parametrize("args,message", [
    (["--num-tokens", "-5"], "argument --num-tokens: must be a positive integer (got -5)"),
    (["--num-tokens", "0"], "argument --num-tokens: must be a positive integer (got 0)"),
    (["--num-tokens", "1e4"], "argument --num-tokens: '1e4' is not an integer"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer (got 0)"),
    (["--batch-size", "-1"], "argument --batch-size: must be a positive integer (got -1)"),
    (["--cache", ""], "argument --cache: must not be empty"),
    (["--device", ""], "argument --device: must not be empty"),
    (["--method", "median"], "argument --method: invalid choice: 'median'"),
])
def test_threshold_arguments_are_refused_before_the_sae_is_touched(args, message, sae_folder, capsys):
    before = digest(sae_folder)
    err = refused(capsys, ["threshold", str(sae_folder), *args])
    assert err.startswith("workbench threshold: error: ") and message in err
    assert err.rstrip().endswith("see workbench threshold --help")
    assert digest(sae_folder) == before


@pytest.mark.parametrize("argv,message", [
    ([], "workbench: error: name a command: collect, train, inspect, run, plan, eval, threshold"),
    (["trian"], "workbench: error: argument COMMAND: invalid choice: 'trian'"),
    (["--bogus"], "workbench: error: unrecognized arguments: --bogus"),
    (["plan"], "workbench plan: error: the following arguments are required: recipe"),
    (["plan", DEMO, "--bogus"], "workbench plan: error: unrecognized arguments: --bogus"),
    (["inspect", "cache", "--top", "-1"], "workbench inspect: error: argument --top: must be 0 or more (got -1)"),
    (["verify", "dir", "--tolerance", "-1"], "argument --tolerance: must be a finite number >= 0 (got -1)"),
    (["verify", "dir", "--tolerance", "nan"], "argument --tolerance: must be a finite number >= 0 (got nan)"),
    (["verify", "dir", "--cache", ""], "argument --cache: must not be empty"),
    (["convert", "src", "--to", "saelens", "--out", "dst", "--k", "0"], "argument --k: must be a positive integer (got 0)"),
    (["convert", "src", "--to", "onnx", "--out", "dst"], "argument --to: invalid choice: 'onnx'"),
    (["export", "run", "--to", "saelens", "--out", ""], "workbench export: error: argument --out: must not be empty"),
    (["export", "run", "--to", "saelens", "--out", "o", "--series", ""], "argument --series: must not be empty"),
    (["export", "run", "--out", "o"], "the following arguments are required: --to"),
    (["run", DEMO, "--stages", ""], "argument --stages: '' has an empty stage name"),
    (["run", DEMO, "--stages", "collect,"], "argument --stages: 'collect,' has an empty stage name"),
])
def test_a_refused_command_line_is_one_line_naming_the_argument(argv, message, capsys):
    assert message in refused(capsys, argv)


def test_an_unknown_stage_is_one_line(tmp_path, capsys):
    err = refused(capsys, ["run", DEMO, f"train.out={tmp_path / 'saes'}", "--stages", "collect,trian"])
    assert "unknown stage(s) ['trian']" in err and not (tmp_path / "saes").exists()


def test_the_cli_as_a_process_prints_one_line_and_exits_2(sae_folder):
    before = digest(sae_folder)
    proc = subprocess.run([sys.executable, "-m", "workbench", "threshold", str(sae_folder), "--num-tokens", "-5"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["workbench threshold: error: argument --num-tokens: must be a positive integer "
                                        "(got -5); see workbench threshold --help"]
    assert digest(sae_folder) == before
    proc = subprocess.run([sys.executable, "-m", "workbench"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "name a command" in proc.stderr


def test_help_still_prints_usage_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "workbench", "run", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: workbench run") and "--dry-run" in proc.stdout


@pytest.mark.parametrize("argv", [
    ["plan", DEMO, "collect.batch_size=4"],
    ["run", "--dry-run", DEMO, "collect.batch_size=4"],
    ["run", DEMO, "--dry-run", "collect.batch_size=4"],
    ["run", DEMO, "collect.batch_size=4", "--dry-run"],
])
def test_overrides_are_accepted_anywhere_after_the_command(argv, capsys):
    assert main(argv) == 0
    assert "collect    256 forward batches" in capsys.readouterr().out  # the demo's 1024 rows / 4


def test_the_recipe_is_the_first_positional(capsys):
    assert "recipe file not found: collect.batch_size=4" in refused(capsys, ["plan", "collect.batch_size=4", DEMO])
