"""hf:// references: a huggingface_hub cache laid out exactly as snapshot_download leaves it (blobs named by
their git or LFS hash, snapshots/<commit>/ of symlinks into them, refs/<branch or tag>, the tree listing
trees/<commit>.json) holds the published Qwen3 dictionary_learning layout and the Gemma SAELens layout, made
by the workbench's own writers. With no network (HF_HUB_OFFLINE, or an endpoint that refuses connections)
the references resolve to the right folder, revision and format, through the real snapshot_download; every
entry point that takes an SAE folder takes one; a repo or folder not in the cache is one line naming the repo
and the fix."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
from tiny_sae import DEMO, MODEL

from workbench.attach import AttachedSAE
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.evaluate import evaluate_folders
from workbench.formats import dictionary_learning as dl
from workbench.formats.convert import convert, detect_format, load_sae, read_weights
from workbench.hub import resolve_sae_path
from workbench.inference import filter_settings
from workbench.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE

pytestmark = pytest.mark.usefixtures("one_thread")

QWEN = "adamkarvonen/qwen3-8b-saes"
QWEN_DIR = "saes_Qwen_Qwen3-8B_batch_top_k/resid_post_layer_18"
GEMMA = "chanind/gemma-3-1b-batch-topk-matryoshka-saes-w-32k-l0-40"
GEMMA_DIR = "blocks.12.hook_resid_post"
TINY = "workbench-tests/tiny-qwen3-saes"  # an SAE of the embedded model, for the commands that run it
COMMIT_QWEN, COMMIT_GEMMA, COMMIT_GEMMA_V1, COMMIT_TINY = (hashlib.sha1(s.encode()).hexdigest() for s in "abcd")
LFS_SUFFIXES = (".pt", ".safetensors")  # stored with git-lfs on the hub: blobs named by sha256


def seeded(sae, seed: int, threshold: float = 0.05):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.1)
        sae.threshold.fill_(threshold)
    return sae


def dl_folder(sae, folder: Path, layer: int, lm_name: str, sink_multiple: float | None = 10.0) -> Path:
    """A dictionary_learning SAE folder as training writes it (workbench writers)."""
    groups = [0.25, 0.75] if isinstance(sae, MatryoshkaBatchTopKSAE) else None
    trainer = dl.trainer_section(sae, lr=1e-3, steps=10, auxk_alpha=0.0, warmup_steps=0, decay_start=None,
                                 threshold_beta=0.999, threshold_start_step=1, seed=0, device="cpu", layer=layer,
                                 lm_name=lm_name, group_fractions=groups, group_weights=None)
    config = {"trainer": trainer, "buffer": dl.buffer_section(sae.activation_dim, 128, 1, 16, 512, "cpu"),
              "workbench": {"model": lm_name, "layer": layer, "sink_multiple": sink_multiple, "sink_median": "real",
                            "drop_first_token": True}}
    dl.save_folder(sae, folder, config, eval_results={"frac_variance_explained": 0.9})
    return folder


def files_of(folder: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def blob_id(path: str, data: bytes) -> str:
    """The blob's name in the cache: the LFS sha256 for LFS files, else git's blob sha1 (the ETag the hub sends)."""
    if path.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def publish(cache: Path, repo_id: str, commit: str, downloaded: dict[str, bytes], listed: dict[str, bytes] | None = None,
            refs: tuple[str, ...] = ("main",)) -> Path:
    """repo_id at `commit` in the cache as after `snapshot_download(repo_id, allow_patterns=...)` fetched the
    `downloaded` files; `listed` (default: the same) is the repo's whole tree, as the tree listing records it.
    Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    entries = {}
    for path, data in (listed or downloaded).items():
        etag = blob_id(path, data)
        lfs = path.endswith(LFS_SUFFIXES)
        entries[path] = TreeCacheEntry(size=len(data), blob_id=hashlib.sha1(data).hexdigest(),
                                       lfs_sha256=etag if lfs else None, lfs_size=len(data) if lfs else None)
        if path not in downloaded:
            continue
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / etag).write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / etag, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    write_tree_cache(str(repo), commit, entries)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """The cache: the Qwen3 series' trainer_2 downloaded (its trainer_0 only listed), the Gemma series' layer 12
    at main and at tag v1 (other weights), and a tiny-model SAE; plus the modules the folders were written from."""
    root = tmp_path_factory.mktemp("hub")
    src = root / "src"
    qwen = seeded(BatchTopKSAE(64, 256, 8), 0)
    trainer_2 = dl_folder(qwen, src / "trainer_2", 18, "Qwen/Qwen3-8B")
    trainer_0 = dl_folder(seeded(BatchTopKSAE(64, 128, 8), 1), src / "trainer_0", 18, "Qwen/Qwen3-8B")
    gemma = {}
    for tag, seed in (("main", 2), ("v1", 3)):
        gemma[tag] = seeded(MatryoshkaBatchTopKSAE(64, 128, 8, [32, 96]), seed)
        convert(dl_folder(gemma[tag], src / f"gemma_dl_{tag}", 12, "google/gemma-3-1b-pt"), "saelens", src / f"gemma_{tag}")
    tiny = seeded(BatchTopKSAE(64, 256, 8), 4)
    tiny_dir = dl_folder(tiny, src / "tiny", 2, MODEL)
    cache = root / "hf_cache"
    qwen_files = files_of(trainer_2, f"{QWEN_DIR}/trainer_2")
    listed = qwen_files | files_of(trainer_0, f"{QWEN_DIR}/trainer_0") | {"README.md": b"# Qwen3-8B SAEs\n"}
    publish(cache, QWEN, COMMIT_QWEN, qwen_files, listed)
    publish(cache, GEMMA, COMMIT_GEMMA, files_of(src / "gemma_main", GEMMA_DIR))
    publish(cache, GEMMA, COMMIT_GEMMA_V1, files_of(src / "gemma_v1", GEMMA_DIR), refs=("v1",))
    publish(cache, TINY, COMMIT_TINY, files_of(tiny_dir, "resid_post_layer_2/trainer_0"))
    return {"cache": cache, "qwen": qwen, "gemma": gemma, "tiny": tiny, "trainer_2": trainer_2}


@pytest.fixture
def offline(hub, monkeypatch) -> Path:
    """huggingface_hub as HF_HUB_OFFLINE=1 HF_HUB_CACHE=<the cache> sets it (it reads both at import)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    return hub["cache"]


def snapshot_dir(cache: Path, repo_id: str, commit: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_a_qwen3_dictionary_learning_reference_resolves_to_its_folder_offline(hub, offline):
    ref = f"hf://{QWEN}/{QWEN_DIR}/trainer_2"
    folder = resolve_sae_path(ref)
    assert folder == snapshot_dir(offline, QWEN, COMMIT_QWEN) / QWEN_DIR / "trainer_2"
    assert (folder / "ae.pt").is_symlink()  # the cache's own file, not a copy
    assert detect_format(ref) == "dictionary_learning"
    same_state(load_sae(ref), hub["qwen"])
    assert read_weights(ref).info.layer == 18
    assert filter_settings(ref) == {"multiple": 10.0, "median_over": "real"}
    attached = AttachedSAE.from_folder(ref)
    assert (attached.layer, attached.sink_multiple, attached.drop_first_token, attached.d_in) == (18, 10.0, True, 64)
    assert resolve_sae_path(Path(ref)) == folder  # Path() collapses hf:// to hf:/: still a reference


def test_a_gemma_saelens_reference_resolves_at_each_revision(hub, offline):
    at_main = snapshot_dir(offline, GEMMA, COMMIT_GEMMA) / GEMMA_DIR
    at_v1 = snapshot_dir(offline, GEMMA, COMMIT_GEMMA_V1) / GEMMA_DIR
    for ref, folder, tag in ((f"hf://{GEMMA}/{GEMMA_DIR}", at_main, "main"), (f"hf://{GEMMA}@main/{GEMMA_DIR}", at_main, "main"),
                             (f"hf://{GEMMA}@v1/{GEMMA_DIR}", at_v1, "v1"),
                             (f"hf://{GEMMA}@{COMMIT_GEMMA_V1}/{GEMMA_DIR}", at_v1, "v1")):
        assert resolve_sae_path(ref) == folder, ref
        assert detect_format(ref) == "saelens"
        x_ND = torch.randn(16, 64)
        with torch.no_grad():
            ours, expected = load_sae(ref), hub["gemma"][tag]
            torch.testing.assert_close(ours.encode(x_ND), expected.encode(x_ND), rtol=0, atol=1e-5)
        assert read_weights(ref).group_sizes == [32, 96]


def test_only_the_referenced_folder_is_asked_of_the_cache(hub, offline):
    """The tree listing names trainer_0 and a README that were never downloaded. snapshot_download checks the
    files its allow_patterns select: the whole repo is incomplete, trainer_2 alone is complete, so resolving
    trainer_2 proves only that folder was asked for, and asking for trainer_0 offline fails naming the fix."""
    from huggingface_hub.errors import IncompleteSnapshotError

    with pytest.raises(IncompleteSnapshotError):
        huggingface_hub.snapshot_download(QWEN)
    assert resolve_sae_path(f"hf://{QWEN}/{QWEN_DIR}/trainer_2").is_dir()
    with pytest.raises(WorkbenchError) as err:
        resolve_sae_path(f"hf://{QWEN}/{QWEN_DIR}/trainer_0")
    message = str(err.value)
    assert "\n" not in message and QWEN in message and "the hub cannot be reached" in message
    assert "unset HF_HUB_OFFLINE" in message and "HF_HUB_CACHE" in message


@pytest.mark.parametrize(("ref", "expected"), [
    ("hf://nobody/no-such-saes/layer_3", "the hub cannot be reached and the cache has no copy of nobody/no-such-saes"),
    (f"hf://{GEMMA}@v2/{GEMMA_DIR}", f"cache has no copy of {GEMMA} at revision v2"),
    (f"hf://{GEMMA}/blocks.99.hook_resid_post", f"the repo {GEMMA} has no files under blocks.99.hook_resid_post"),
    ("hf://just-a-name", "is not a hub reference"),
])
def test_references_that_cannot_resolve_are_one_line(offline, ref, expected):
    with pytest.raises(WorkbenchError, match=expected) as err:
        resolve_sae_path(ref)
    assert "\n" not in str(err.value)


def test_an_unreachable_hub_falls_back_to_the_cache(hub, monkeypatch):
    """Online mode, but the endpoint refuses connections: a cached folder resolves; an uncached one is one line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert resolve_sae_path(f"hf://{GEMMA}/{GEMMA_DIR}") == snapshot_dir(hub["cache"], GEMMA, COMMIT_GEMMA) / GEMMA_DIR
    with pytest.raises(WorkbenchError, match="the hub cannot be reached and the cache has no copy of nobody/absent"):
        resolve_sae_path("hf://nobody/absent/x")


def test_commands_take_references_with_the_environment_set(hub, tmp_path):
    """The real environment variables (read when huggingface_hub is imported), in a fresh process: convert from
    a reference, and the error of one that is not cached (exit 2, one line naming the repo and the fix)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub["cache"]), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "converted"
    ok = subprocess.run([sys.executable, "-m", "workbench", "convert", f"hf://{QWEN}/{QWEN_DIR}/trainer_2", "--to",
                         "saelens", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    x_ND = torch.randn(16, 64)
    with torch.no_grad():
        torch.testing.assert_close(load_sae(out).encode(x_ND), hub["qwen"].encode(x_ND), rtol=0, atol=1e-5)
    bad = subprocess.run([sys.executable, "-m", "workbench", "features", "hf://nobody/no-such-saes/layer_3", "--out",
                          str(tmp_path / "pages")], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/no-such-saes" in lines[0] and "unset HF_HUB_OFFLINE" in lines[0], bad.stderr


def test_eval_reads_a_reference_and_writes_nothing_into_the_cache(hub, offline, capsys):
    ref = f"hf://{TINY}/resid_post_layer_2/trainer_0"
    folder = snapshot_dir(offline, TINY, COMMIT_TINY) / "resid_post_layer_2" / "trainer_0"
    before = {p.name: (p.is_symlink(), p.read_bytes()) for p in folder.iterdir()}
    results = evaluate_folders(ref, str(DEMO), ["data.num_tokens=2048", "eval.num_tokens=512"])
    assert list(results) == [str(folder)] and results[str(folder)]["predicted_tokens"] > 0
    assert results[str(folder)]["filter_source"] == "sae config"
    assert {p.name: (p.is_symlink(), p.read_bytes()) for p in folder.iterdir()} == before
    assert main(["eval", ref, str(DEMO), "data.num_tokens=2048", "eval.num_tokens=512"]) == 0
    assert "frac_rec" in capsys.readouterr().out
    assert {p.name: (p.is_symlink(), p.read_bytes()) for p in folder.iterdir()} == before


def test_convert_and_the_python_loader_agree_on_a_reference(hub, offline, tmp_path):
    assert main(["convert", f"hf://{GEMMA}@v1/{GEMMA_DIR}", "--to", "dictionary_learning", "--out", str(tmp_path / "dl")]) == 0
    same_state(load_sae(tmp_path / "dl"), hub["gemma"]["v1"])
    config = json.loads((tmp_path / "dl" / "config.json").read_text())
    assert config["trainer"]["layer"] == 12 and config["trainer"]["dict_class"] == "MatryoshkaBatchTopKSAE"


def test_train_init_from_takes_a_reference(hub, offline):
    """train.init_from's loader (the fast sibling of the slow test below, which trains from one)."""
    from workbench.config import SAEConfig
    from workbench.training.loop import _load_init

    sae = _load_init(f"hf://{TINY}", 2, SAEConfig(name="trainer_0", arch="batchtopk", width=256, k=8), 64)
    same_state(sae, hub["tiny"])


@pytest.mark.slow
def test_features_verify_and_fine_tuning_from_a_reference(hub, offline, tmp_path):
    """`workbench features` with a cache, `workbench verify` against both reference libraries, and two training
    steps from train.init_from=hf://..., each on the cached tiny-model SAE."""
    import yaml

    from workbench.collect import collect
    from workbench.config import load_recipe
    from workbench.training import train

    ref = f"hf://{TINY}/resid_post_layer_2/trainer_0"
    cache = tmp_path / "cache"
    collect(load_recipe(DEMO, [f"collect.out={cache}", "data.num_tokens=4096", "collect.layers=[2]"]))
    assert main(["features", ref, "--cache", str(cache), "--out", str(tmp_path / "pages"), "--top", "3"]) == 0
    doc = json.loads((tmp_path / "pages" / "features.json").read_text())
    assert doc["sae"]["folder"] == str(resolve_sae_path(ref)) and doc["sae"]["width"] == 256
    assert main(["verify", f"hf://{TINY}"]) == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(DEMO), "train": {
        "cache": str(cache), "layers": [2], "saes": [{"name": "trainer_0", "arch": "batchtopk", "width": 256, "k": 8}],
        "batch_size": 256, "num_tokens": 512, "warmup_steps": 0, "threshold_start_step": 0, "lr": 1e-10,
        "eval_tokens": 256, "init_from": f"hf://{TINY}", "out": str(tmp_path / "saes")}}))
    train(load_recipe(recipe))
    tuned = dl.load_folder(tmp_path / "saes" / "resid_post_layer_2" / "trainer_0")[0]
    torch.testing.assert_close(tuned.encoder.weight, hub["tiny"].encoder.weight, rtol=1e-5, atol=1e-6)
    extra = json.loads((tmp_path / "saes" / "resid_post_layer_2" / "trainer_0" / "config.json").read_text())["workbench"]
    assert extra["init_from"] == f"hf://{TINY}"


def test_attribute_takes_a_reference_and_threshold_refuses_one(hub, offline, tmp_path, capsys):
    """attribute reads the cached folder (its report names the reference); threshold, which writes into the SAE
    folder, refuses a reference in one line rather than change the hub cache's copy."""
    ref = f"hf://{TINY}/resid_post_layer_2/trainer_0"
    out = tmp_path / "attribution"
    assert main(["attribute", str(DEMO), ref, "--prompt", "The garden heard a song at dawn, and the", "--target", " old",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "attribution.json").read_text())
    assert doc["sae"]["name"] == ref and doc["sae"]["layer"] == 2 and doc["excluded"][0]["status"] == "first token"
    capsys.readouterr()
    assert main(["threshold", ref]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a hub reference" in err[-1] and "hf download" in err[-1]
