"""`workbench upload EXPORT --repo-id OWNER/NAME --dry-run`: exactly the export's files, at their published repo
paths, and nothing else; no network module is imported. The real upload (huggingface_hub's create_commit) is
not exercised here: there is no hub to reach."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from test_export import SERIES, write_sae

from workbench.cli import main
from workbench.export import export_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def exports(tmp_path) -> Path:
    run = tmp_path / "run"
    for layer in (2, 3):
        write_sae(run, layer, "trainer_0", "batchtopk", sparsity=layer == 2)
        write_sae(run, layer, "trainer_1", "matryoshka")
    for fmt in ("dictionary_learning", "saelens"):
        export_run(run, fmt, tmp_path / "export" / fmt)
    return tmp_path / "export"


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def listed(stdout: str) -> dict[str, str]:
    """The dry run's `LOCAL -> REPO_PATH` lines, as repo path -> local path."""
    pairs = [line.split(" -> ") for line in stdout.splitlines() if " -> " in line]
    return {repo: local for local, repo in pairs}


@pytest.mark.parametrize("fmt, sae_files", [
    ("dictionary_learning", {"ae.pt", "config.json", "eval_results.json"}),
    ("saelens", {"cfg.json", "sae_weights.safetensors"}),
])
def test_dry_run_lists_every_exported_file_at_its_published_path_and_nothing_else(exports, capsys, fmt, sae_files):
    root = exports / fmt
    (root / "README.md.tmp").write_text("a killed write")  # left out, as the marker is
    before = digests(root)
    assert main(["upload", str(root), "--repo-id", "me/saes", "--dry-run"]) == 0
    out = capsys.readouterr().out
    paths = listed(out)
    if fmt == "dictionary_learning":  # the series folder, as the published repos hold it
        ids = [f"{SERIES}/resid_post_layer_{layer}/trainer_{i}" for layer in (2, 3) for i in (0, 1)]
    else:  # the SAELens SAE-id folders
        ids = [f"blocks.{layer}.hook_resid_post/trainer_{i}" for layer in (2, 3) for i in (0, 1)]
    assert {str(Path(p).parent) for p in paths if p != "README.md"} == set(ids)
    for sae_id in ids:
        assert {f"{sae_id}/{name}" for name in sae_files} <= set(paths)
    on_disk = {p for p in before if p not in (".workbench-output.json", "README.md.tmp")}
    assert set(paths) == on_disk and "README.md" in paths  # every file of the export, the model card, only those
    assert all(Path(local) == root / repo for repo, local in paths.items())
    assert out.splitlines()[-1] == f"{len(on_disk)} files would be uploaded to me/saes (dry run: nothing was sent)"
    assert digests(root) == before  # nothing touched


def test_dry_run_imports_nothing_that_reaches_the_network(exports):
    code = ("import sys; from workbench.cli import main; "
            f"rc = main(['upload', {str(exports / 'saelens')!r}, '--repo-id', 'me/saes', '--revision', 'v2', '--dry-run']); "
            "print([m for m in sys.modules if m.split('.')[0] in ('huggingface_hub', 'requests', 'httpx', 'urllib3')]); "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
    assert "would be uploaded to me/saes@v2" in proc.stdout


@pytest.mark.parametrize("case, fragment", [
    ("missing", "is not a folder"),
    ("parent", "it holds the exports dictionary_learning/, saelens/: give one of them"),
    ("not_export", "is not a workbench export"),
    ("incomplete", "is incomplete"),
    ("lacks", "lacks 1 of its files (README.md)"),
    ("bad_repo", "is not a hub repo id"),
])
def test_errors_are_one_line_exit_2_and_change_nothing(exports, tmp_path, capsys, case, fragment):
    root, repo_id = exports / "saelens", "me/saes"
    if case == "missing":
        root = tmp_path / "nowhere"
    elif case == "parent":
        root = exports
    elif case == "not_export":
        root = tmp_path / "run" / "resid_post_layer_2"
    elif case == "incomplete":
        marker = root / ".workbench-output.json"
        marker.write_text(marker.read_text().replace('"complete": true', '"complete": false'))
    elif case == "lacks":
        (root / "README.md").unlink()
    else:
        repo_id = "me/--saes"
    before = digests(exports)
    assert main(["upload", str(root), "--repo-id", repo_id, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert fragment in captured.err and captured.err.count("\n") == 1 and captured.out == ""
    assert digests(exports) == before
