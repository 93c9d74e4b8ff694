"""Untrusted checkpoints: a pickle that would run code is refused before anything runs, and damaged
files of either format are one clear error (one line from the CLI, exit 2)."""

from __future__ import annotations

import builtins
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.formats import dictionary_learning as dl
from workbench.formats import saelens
from workbench.formats.convert import convert, read_weights


class WritesAFile:
    """Unpickling this calls exec, which writes `marker`: the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def malicious_folder(folder: Path, marker: Path, kind: str) -> Path:
    """An SAE folder whose ae.pt runs code when unpickled: torch's zip format, its legacy format, or a raw pickle."""
    folder.mkdir(parents=True)
    state = {"b_dec": torch.zeros(4), "k": torch.tensor(2, dtype=torch.int32), "payload": WritesAFile(marker)}
    if kind == "zip":
        torch.save(state, folder / dl.AE_FILE)
    elif kind == "legacy":
        torch.save(state, folder / dl.AE_FILE, _use_new_zipfile_serialization=False)
    else:
        (folder / dl.AE_FILE).write_bytes(pickle.dumps({"payload": WritesAFile(marker)}, protocol=2))
    config = {"trainer": {"dict_class": "BatchTopKSAE", "k": 2, "layer": 0, "lm_name": "m"}, "buffer": {"ctx_len": 8}}
    (folder / dl.CONFIG_FILE).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw_pickle"])
def test_malicious_ae_pt_is_refused_and_never_runs(tmp_path, kind, capsys):
    marker = tmp_path / "pwned.txt"
    folder = malicious_folder(tmp_path / "sae", marker, kind)
    for mmap in (False, True):
        with pytest.raises(WorkbenchError, match="refused without running it") as err:
            dl.load_state_dict(folder / dl.AE_FILE, mmap=mmap)
        assert "unpickling it would call exec" in str(err.value) and "\n" not in str(err.value)
    for argv in (["convert", str(folder), "--to", "saelens", "--out", str(tmp_path / "out")],
                 ["export", str(tmp_path), "--to", "saelens", "--out", str(tmp_path.parent / f"{tmp_path.name}_export")]):
        assert main(argv) == 2
        err_lines = capsys.readouterr().err.strip().splitlines()
        assert len(err_lines) == 1 and "refused without running it" in err_lines[0]
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_the_malicious_payload_is_live(tmp_path):
    """Control: loaded without weights_only (as old code did), the same file does write its marker."""
    marker = tmp_path / "pwned.txt"
    folder = malicious_folder(tmp_path / "sae", marker, "zip")
    code = f"import torch; torch.load({str(folder / dl.AE_FILE)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert marker.read_text() == "pwned"


def good_dl_folder(folder: Path) -> Path:
    state = {"b_dec": torch.zeros(8), "k": torch.tensor(2, dtype=torch.int32), "threshold": torch.tensor(0.5),
             "decoder.weight": torch.randn(8, 32), "encoder.weight": torch.randn(32, 8), "encoder.bias": torch.zeros(32)}
    folder.mkdir(parents=True)
    torch.save(state, folder / dl.AE_FILE)
    config = {"trainer": {"dict_class": "BatchTopKSAE", "k": 2, "layer": 0, "lm_name": "m"}, "buffer": {"ctx_len": 8}}
    (folder / dl.CONFIG_FILE).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "config"])
def test_damaged_dictionary_learning_folder_is_one_clear_error(tmp_path, damage, capsys):
    folder = good_dl_folder(tmp_path / "sae")
    data = (folder / dl.AE_FILE).read_bytes()
    if damage == "truncated":
        (folder / dl.AE_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        (folder / dl.AE_FILE).write_bytes(b"")
    elif damage == "garbage":
        (folder / dl.AE_FILE).write_bytes(b"\x80\x02not a checkpoint at all" * 50)
    else:
        (folder / dl.CONFIG_FILE).write_text('{"trainer": {"dict_class": ')
    with pytest.raises(WorkbenchError) as err:
        read_weights(folder)
    assert "\n" not in str(err.value)
    assert any(word in str(err.value) for word in ("truncated or corrupt", "empty", "refused", "not valid JSON"))
    assert main(["convert", str(folder), "--to", "saelens", "--out", str(tmp_path / "out")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def good_saelens_folder(folder: Path) -> Path:
    convert(good_dl_folder(folder.parent / "dl_src"), "saelens", folder)
    return folder


@pytest.mark.parametrize("damage", ["truncated", "header", "sparsity", "cfg"])
def test_damaged_saelens_folder_is_one_clear_error(tmp_path, damage, capsys):
    folder = good_saelens_folder(tmp_path / "sl")
    weights = folder / saelens.WEIGHTS_FILE
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[:-100])
    elif damage == "header":
        weights.write_bytes(data[:8] + b"{not json" + data[17:])
    elif damage == "sparsity":
        save_file({"sparsity": torch.zeros(32)}, str(folder / saelens.SPARSITY_FILE))
        (folder / saelens.SPARSITY_FILE).write_bytes((folder / saelens.SPARSITY_FILE).read_bytes()[:50])
    else:
        (folder / saelens.CFG_FILE).write_text("{")
    with pytest.raises(WorkbenchError, match="truncated or corrupt|not valid JSON") as err:
        read_weights(folder)
    assert "\n" not in str(err.value)
    assert main(["convert", str(folder), "--to", "dictionary_learning", "--out", str(tmp_path / "out")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / dl.AE_FILE).exists()
