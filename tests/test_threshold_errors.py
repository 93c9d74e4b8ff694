"""`workbench threshold` and `workbench eval` when something is wrong: bad arguments are one line from the
CLI and the Python API alike (0 is refused, not read as the default), the threshold's four files are
written as one set (a kill between two renames is completed by the next run, with a clean history), a
full disk leaves the SAE as it was, and folders that are not SAEs, or not SAEs of the model, are one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from workbench.cli import main
from workbench.collect import collect
from workbench.config import load_recipe
from workbench.errors import WorkbenchError
from workbench.formats import dictionary_learning as dl
from workbench.threshold import (
    COMMIT_FILE,
    STAGED,
    WRITTEN,
    calibrate,
    calibrated_method,
    finish_interrupted_write,
)

REPO = Path(__file__).resolve().parents[1]
LAYER = 2
DATA = ["data.num_tokens=16384", "data.context_length=64"]
ARGS = ["--batch-size", "256", "--num-tokens", "2048"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A BatchTopK SAE trained by `workbench train` on layer 2 of a demo cache (60 steps), not calibrated."""
    root = tmp_path_factory.mktemp("threshold_errors")
    collect(load_recipe(REPO / "recipes" / "demo.yaml", [*DATA, f"collect.out={root / 'cache'}"]))
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(REPO / "recipes" / "demo.yaml"), "train": {
        "cache": str(root / "cache"), "layers": [LAYER], "saes": [{"name": "btk", "arch": "batchtopk", "width": 128, "k": 8}],
        "batch_size": 256, "num_tokens": 256 * 60, "warmup_steps": 10, "threshold_start_step": 10, "eval_tokens": 2048,
        "out": str(root / "saes")}}))
    assert main(["train", str(recipe)]) == 0
    return root / "saes" / f"resid_post_layer_{LAYER}" / "btk"


@pytest.fixture
def sae(trained, tmp_path) -> Path:
    """A private copy of the trained SAE folder."""
    return Path(shutil.copytree(trained, tmp_path / "btk"))


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def error_line(stderr: str, command: str = "threshold") -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"workbench {command}: error: ")
    return lines[0]


def threshold_of(folder: Path) -> float:
    return float(dl.load_state_dict(folder / dl.AE_FILE)["threshold"])


def record_of(folder: Path) -> dict | None:
    return json.loads((folder / dl.CONFIG_FILE).read_text())["workbench"].get("threshold")


BAD_ARGUMENTS = [
    (["--num-tokens", "-5"], "--num-tokens: must be a positive integer"),
    (["--num-tokens", "0"], "--num-tokens: must be a positive integer"),
    (["--batch-size", "-256"], "--batch-size: must be a positive integer"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--device", "cuda"], "--device is 'cuda' but CUDA is not available here; use cpu or leave it unset"),
    (["--device", "cuda:3"], "--device is 'cuda:3' but CUDA is not available here"),
    (["--device", "gpu0"], "--device 'gpu0' is not a torch device (e.g. cpu, cuda, cuda:1)"),
    (["--device", "xpu"], "--device is 'xpu' but that device is not usable here"),
]


@pytest.mark.parametrize("args,message", BAD_ARGUMENTS)
def test_bad_arguments_are_one_line_and_change_nothing(sae, capsys, args, message):
    if "cuda" in args[-1] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = digests(sae)
    rc = main(["threshold", str(sae), "--batch-size", "256", "--num-tokens", "2048", *args])
    assert rc == 2 and message in error_line(capsys.readouterr().err)
    assert digests(sae) == before


@pytest.mark.parametrize("kwargs,message", [
    ({"num_tokens": 0}, r"--num-tokens \(threshold.num_tokens\) must be a positive number of tokens, got 0"),
    ({"num_tokens": -2048}, "got -2048"),
    ({"batch_size": 0}, r"--batch-size \(threshold.batch_size\) must be a positive number of tokens, got 0"),
    ({"batch_size": 256.0}, "got 256.0"),
    ({"method": ""}, "--method must be one of ema, batch-min, l0"),
    ({"device": "gpu0"}, "--device 'gpu0' is not a torch device"),
])
def test_the_python_api_refuses_the_same_values_and_zero_is_not_the_default(sae, kwargs, message):
    before = digests(sae)
    with pytest.raises(WorkbenchError, match=message):
        calibrate(sae, **({"batch_size": 256, "num_tokens": 2048} | kwargs))
    assert digests(sae) == before


def stage_a_kill(folder: Path, calibrated: Path, before_marker: bool = False) -> None:
    """What a kill during a threshold write leaves in `folder`, the write's result being `calibrated`'s
    files: after the marker and the first rename (ae.pt new, the rest staged), or before the marker."""
    for name in WRITTEN:
        shutil.copyfile(calibrated / name, folder / (name + STAGED))
    if not before_marker:
        (folder / COMMIT_FILE).write_text(json.dumps({"files": list(WRITTEN)}))
        os.replace(folder / (dl.AE_FILE + STAGED), folder / dl.AE_FILE)


def test_a_kill_between_the_renames_is_completed_and_the_next_run_records_a_clean_history(sae, tmp_path, capsys):
    ema = threshold_of(sae)
    calibrated = Path(shutil.copytree(sae, tmp_path / "calibrated"))
    calibrate(calibrated, method="l0", batch_size=256, num_tokens=2048)
    l0 = threshold_of(calibrated)
    assert l0 != ema and record_of(calibrated)["value"] == pytest.approx(l0)

    stage_a_kill(sae, calibrated)
    assert threshold_of(sae) == l0 and record_of(sae) is None  # the mixed state: ae.pt new, config.json old

    copy = Path(shutil.copytree(sae, tmp_path / "copy"))
    assert finish_interrupted_write(copy) is True
    assert digests(copy) == digests(calibrated)  # exactly the set the write would have left
    assert "completed the threshold write an earlier run left unfinished" in capsys.readouterr().err

    report = calibrate(sae, method="batch-min", batch_size=256, num_tokens=2048)
    record = record_of(sae)
    assert report.previous == {"threshold": l0, "method": "l0"} == record["previous"]
    assert record["method"] == "batch-min" and threshold_of(sae) == pytest.approx(record["value"])
    assert record["ema"] == pytest.approx(ema)
    assert not list(sae.glob(f"*{STAGED}*")) and not (sae / COMMIT_FILE).exists()


def test_a_kill_before_the_marker_leaves_the_sae_as_it_was(sae, tmp_path):
    ema = threshold_of(sae)
    calibrated = Path(shutil.copytree(sae, tmp_path / "calibrated"))
    calibrate(calibrated, method="l0", batch_size=256, num_tokens=2048)
    before = digests(sae)
    stage_a_kill(sae, calibrated, before_marker=True)
    assert calibrated_method(sae) is None  # the pipeline's check: nothing was calibrated
    assert digests(sae) == before  # the staged files are gone, the SAE untouched
    report = calibrate(sae, method="batch-min", batch_size=256, num_tokens=2048)
    assert report.previous == {"threshold": ema, "method": "ema"}


def test_the_pipeline_check_completes_an_interrupted_write(sae, tmp_path):
    calibrated = Path(shutil.copytree(sae, tmp_path / "calibrated"))
    calibrate(calibrated, method="l0", batch_size=256, num_tokens=2048)
    stage_a_kill(sae, calibrated)
    assert calibrated_method(sae) == "l0" and digests(sae) == digests(calibrated)


def test_a_damaged_commit_marker_is_one_line(sae, capsys):
    (sae / COMMIT_FILE).write_text('{"files": ["../../etc/passwd"]}')
    rc = main(["threshold", str(sae), *ARGS])
    assert rc == 2 and f"{sae / COMMIT_FILE} does not list the files of a threshold write" in error_line(capsys.readouterr().err)


def test_eval_results_that_are_not_an_object_stop_the_write_before_it_starts(sae, capsys):
    (sae / dl.EVAL_FILE).write_text("[]")
    before = digests(sae)
    rc = main(["threshold", str(sae), *ARGS])
    assert rc == 2 and f"{sae / dl.EVAL_FILE} holds a JSON list, not an object" in error_line(capsys.readouterr().err)
    assert digests(sae) == before


def test_a_full_disk_during_the_write_leaves_the_sae_as_it_was(sae):
    """`ulimit -f 16` (KiB): ae.pt (66 KiB) cannot be staged; nothing of the set is renamed."""
    before = digests(sae)
    command = f"ulimit -f 16; exec {sys.executable} -m workbench threshold {sae} {' '.join(ARGS)}"
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert f"cannot write {sae / (dl.AE_FILE + STAGED)}: " in line and "the SAE was left as it was" in line
    assert digests(sae) == before


def test_threshold_of_a_folder_that_is_not_an_sae_is_one_line(tmp_path, capsys):
    rc = main(["threshold", str(tmp_path / "nowhere"), *ARGS])
    assert rc == 2 and f"{tmp_path / 'nowhere'} is not a directory" in error_line(capsys.readouterr().err)
    rc = main(["threshold", str(tmp_path), *ARGS])
    assert rc == 2 and f"{tmp_path / dl.CONFIG_FILE} does not exist" in error_line(capsys.readouterr().err)


EVAL = [str(REPO / "recipes" / "demo.yaml"), *DATA, "eval.num_tokens=256", "eval.batch_size=4"]


def test_eval_of_a_folder_without_an_sae_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["eval", str(tmp_path / "empty"), *EVAL])
    assert rc == 2 and f"no SAE folder (ae.pt + config.json) at or under {tmp_path / 'empty'}" in \
        error_line(capsys.readouterr().err, "eval")


def test_eval_of_an_sae_that_does_not_fit_the_model_is_one_line_before_the_model_loads(sae, capsys):
    config = json.loads((sae / dl.CONFIG_FILE).read_text())
    config["trainer"]["layer"] = 9
    (sae / dl.CONFIG_FILE).write_text(json.dumps(config))
    before = digests(sae)
    rc = main(["eval", str(sae), *EVAL])
    line = error_line(capsys.readouterr().err, "eval")
    assert rc == 2 and f"{sae} is an SAE of layer 9, but embedded:tiny-qwen3 has layers 0..3" in line
    assert digests(sae) == before


def test_eval_completes_an_interrupted_threshold_write_before_it_merges(sae, tmp_path, capsys):
    """Otherwise completing it later would put the staged eval_results.json over the merged one."""
    calibrated = Path(shutil.copytree(sae, tmp_path / "calibrated"))
    calibrate(calibrated, method="l0", batch_size=256, num_tokens=2048)
    stage_a_kill(sae, calibrated)
    assert main(["eval", str(sae), *EVAL]) == 0
    results = json.loads((sae / dl.EVAL_FILE).read_text())
    at_threshold = json.loads((calibrated / dl.EVAL_FILE).read_text())
    assert results["l0"] == at_threshold["l0"] and "frac_recovered" in results and "loss_original" in results
    assert not list(sae.glob(f"*{STAGED}*")) and not (sae / COMMIT_FILE).exists()
    assert record_of(sae)["method"] == "l0"
