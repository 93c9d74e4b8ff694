"""Mistakes in recipe files and overrides: one line naming the file or the override (and the line and column
where the YAML parser stopped), exit status 2 from every command that takes a recipe, before anything is
written; and the override syntax the README shows (`train.saes[0].k=32`) works."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.config import load_recipe
from workbench.errors import WorkbenchError
from workbench.plan import plan

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo.yaml"


def refused(capsys, argv: list[str]) -> str:
    """Run the CLI, assert it failed with one line on stderr and status 2, return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --- recipe files ---------------------------------------------------------------------------------------

FILE_MISTAKES = [
    ("syntax", "train:\n  batch_size: [1\n",
     ["line 3, column 1: expected ',' or ']'", "flow sequence at line 2, column 15", "a bracket or quote left open"]),
    ("tab indent", "train:\n\tbatch_size: 8\n", ["line 2, column 1", "indent with spaces, not tabs"]),
    ("duplicate key", "train:\n  batch_size: 8\n  batch_size: 16\n",
     ["line 3, column 3: found duplicate key batch_size", "keep one of the two"]),
    ("base a number", "base: 5\n", ["base must name a recipe file relative to it", "(got 5)"]),
    ("base a list of numbers", "base: [5]\n", ["base must name a recipe file", "(got [5])"]),
    ("base missing", "base: missing.yaml\n", ["its base 'missing.yaml'", "does not exist"]),
    ("base a directory", "base: .\n", ["its base '.'", "is a directory"]),
    ("a list", "- 1\n- 2\n", ["holds a YAML list, not a mapping of sections", "sections: model, data, collect"]),
    ("a string", "hello\n", ["holds a YAML scalar ('hello'), not a mapping"]),
    ("a number", "5\n", ["holds a YAML scalar (5), not a mapping"]),
    ("section a number", "train: 5\n", ["recipe key 'train' is a section: give it a mapping", "not 5"]),
    ("section a list", "collect: [1]\n", ["recipe key 'collect' is a section", "collect.layers", "not [1]"]),
    ("list a number", "collect:\n  layers: 3\n", ["recipe key 'collect.layers' takes a list, e.g. [1, 2] (got 3)"]),
    ("SAE a string", "train:\n  saes: [big]\n", ["recipe key 'train.saes[0]' is a section", "not 'big'"]),
    ("flag a string", "data:\n  packing: 'no'\n", ["recipe key 'data.packing' takes true or false (got 'no')"]),
    ("flag a number", "model:\n  trust_remote_code: 2\n", ["'model.trust_remote_code' takes true or false (got 2)"]),
    ("int a word", "collect:\n  batch_size: abc\n", ["recipe key 'collect.batch_size' has a bad value", "it takes an integer"]),
    ("int a float", "collect:\n  batch_size: 2.5\n", ["'collect.batch_size' has a bad value", "'2.5'", "it takes an integer"]),
    ("unknown key", "trian:\n  k: 1\n", ["unknown recipe key 'trian' (did you mean 'train'?)"]),
]


@pytest.mark.parametrize("text,fragments", [m[1:] for m in FILE_MISTAKES], ids=[m[0] for m in FILE_MISTAKES])
def test_a_mistake_in_a_recipe_file_is_one_line_naming_the_file(text, fragments, tmp_path, capsys):
    path = write(tmp_path, "r.yaml", text)
    err = refused(capsys, ["plan", str(path)])
    assert err.startswith(f"workbench plan: error: recipe {path}")
    for fragment in fragments:
        assert fragment in err


def test_a_mistake_in_a_base_names_the_base_file(tmp_path, capsys):
    base = write(tmp_path, "base.yaml", "collect:\n  batch_size: abc\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ncollect:\n  batch_size: 4\n")
    err = refused(capsys, ["plan", str(child)])
    assert f"recipe {base}: recipe key 'collect.batch_size' has a bad value" in err


def test_a_base_cycle_and_unreadable_files_are_one_line(tmp_path, capsys):
    a = write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    assert "includes itself through 'base:'" in refused(capsys, ["plan", str(a)])
    binary = write(tmp_path, "bin.yaml", b"\xff\xfe\x00train")
    assert f"recipe {binary} is not UTF-8 text" in refused(capsys, ["plan", str(binary)])
    assert f"recipe file not found: {tmp_path / 'nope.yaml'}" in refused(capsys, ["plan", str(tmp_path / "nope.yaml")])
    assert f"recipe {tmp_path} is a directory: pass a YAML recipe file" in refused(capsys, ["plan", str(tmp_path)])


def test_an_empty_section_sets_nothing(tmp_path):
    path = write(tmp_path, "r.yaml", f"base: {DEMO}\neval:\n  # every key commented out\n")
    assert load_recipe(path).eval == load_recipe(DEMO).eval


# --- overrides ------------------------------------------------------------------------------------------

OVERRIDE_MISTAKES = [
    ("train.saes[3].k=3", "train.saes[3] is out of range: train.saes has entries 0..2; to add one, set the whole list"),
    ("train.saes[-1].k=3", "bad override 'train.saes[-1].k=3': write it as key=value"),
    ("collect.layers=[1,2", "the value is not valid YAML (expected ',' or ']'"),
    ("train=5", "recipe key 'train' is a section: give it a mapping of its keys"),
    ("train.saes=5", "recipe key 'train.saes' takes a list, e.g. [{name: trainer_0, arch: batchtopk, width: 4096, k: 32}]"),
    ("train.saes[0]=5", "recipe key 'train.saes[0]' is a section"),
    ("train[0]=3", "recipe key 'train' is a section, not a list"),
    ("collect.batch_size=abc", "recipe key 'collect.batch_size' has a bad value: Value 'abc'"),
    ("collect.batch_size=2.5", "recipe key 'collect.batch_size' has a bad value: Value '2.5'"),
    ("data.num_tokens=1e6", "recipe key 'data.num_tokens' has a bad value: Value '1000000.0' of type 'float'"),
    ("collect.layers=abc", "recipe key 'collect.layers' takes a list, e.g. [1, 2] (got 'abc')"),
    ("data.packing=maybe", "recipe key 'data.packing' takes true or false (got 'maybe')"),
    ("data.packing=0", "recipe key 'data.packing' takes true or false (got 0)"),
    ("collect.batch_size", "bad override 'collect.batch_size': write it as key=value"),
    ("=8", "bad override '=8': write it as key=value"),
    ("train.layers[0]=3", "recipe key 'train.layers' is null, not a list: set the whole list"),
    ("collect.batch_size.x=3", "recipe key 'collect.batch_size' is a value, not a section: it has no key 'x'"),
    ("train.saes[0].kk=3", "unknown recipe key 'train.saes[0].kk' (did you mean 'train.saes[0].k'?)"),
    ("eval.target_explained_variance.x=0.5", "recipe key 'eval.target_explained_variance' takes integer keys"),
    ("model.name=", "recipe key 'model.name' has a bad value"),
]


@pytest.mark.parametrize("override,message", OVERRIDE_MISTAKES, ids=[m[0] for m in OVERRIDE_MISTAKES])
def test_a_mistake_in_an_override_is_one_line_naming_the_override(override, message, capsys):
    err = refused(capsys, ["plan", str(DEMO), override])
    assert message in err
    if not message.startswith("bad override"):
        assert f"override '{override}': " in err


def test_the_readme_override_syntax_works():
    r = load_recipe(DEMO, ["collect.batch_size=8", "train.saes[0].k=32"])
    assert r.collect.batch_size == 8 and [s.k for s in r.train.saes] == [32, 16, 16]
    assert r.train.saes[1:] == load_recipe(DEMO).train.saes[1:]  # the other entries are untouched


def test_indexed_overrides_edit_one_entry_and_lists_still_replace_whole():
    base = load_recipe(DEMO).train.saes[1]
    r = load_recipe(DEMO, ["train.saes.1.k=8", "collect.layers=[9,18]", "collect.layers[0]=0.25"])
    assert (r.train.saes[1].k, r.train.saes[1].width, r.train.saes[1].group_fractions) == (8, 512, base.group_fractions)
    assert r.collect.layers == [0.25, 18]
    # a mapping given to one entry merges into it, as a mapping given to a section does
    merged = load_recipe(DEMO, ["train.saes[1]={k: 4}"]).train.saes[1]
    assert (merged.name, merged.arch, merged.k, merged.group_fractions) == ("trainer_1", "matryoshka", 4, base.group_fractions)
    # a whole list replaces the list; its entries get the dataclass defaults
    (only,) = load_recipe(DEMO, ["train.saes=[{name: a, k: 8}]"]).train.saes
    assert (only.name, only.k, only.width, only.arch) == ("a", 8, 4096, "batchtopk")
    r = load_recipe(DEMO, ["eval.target_explained_variance.3=0.5", "eval.target_explained_variance[2]=0.25"])
    assert r.eval.target_explained_variance == {3: 0.5, 2: 0.25}


def test_overrides_after_a_flag_are_applied(capsys):
    assert main(["run", str(DEMO), "collect.batch_size=4", "--dry-run", "train.saes[0].k=32"]) == 0
    out = capsys.readouterr().out
    p = plan(load_recipe(DEMO, ["collect.batch_size=4", "train.saes[0].k=32"]))
    assert f"collect    {p.forward_batches:,} forward batches" in out and p.forward_batches == 1024 // 4
    assert [s.k for s in p.saes if s.name == "trainer_0"] == [32, 32]
    rows = [line.split() for line in out.splitlines() if "batchtopk" in line]  # layer name arch width k ...
    assert [(row[1], row[4]) for row in rows] == [("trainer_0", "32"), ("trainer_0", "32")]


# --- values the types allow but training, evaluation or export cannot use --------------------------------

VALUE_MISTAKES = [
    ("train.saes[1].group_fractions=[0,1.0]", "train.saes[1] (trainer_1).group_fractions entries must be > 0"),
    ("train.saes[1].group_fractions=[-0.25,1.25]", "group_fractions entries must be > 0"),
    ("train.saes[1].group_fractions=[0.5,0.6]", "group_fractions must sum to 1 (got [0.5, 0.6]"),
    # accepted before (within 1e-6), refused by dictionary_learning's math.isclose(sum, 1.0)
    ("train.saes[1].group_fractions=[0.5,0.5000001]", "group_fractions must sum to 1"),
    ("train.saes[1].group_fractions=[0.001,0.999]", "give group sizes [0, 512] at width 512: every group needs"),
    ("train.saes[1].group_weights=[1,2]", "group_weights needs one weight per group (3), got 2"),
    ("train.saes[1].group_weights=[1,-1,1]", "group_weights must be >= 0 and not all 0"),
    ("train.saes[1].group_weights=[0,0,0]", "group_weights must be >= 0 and not all 0"),
    ("train.saes[0].group_fractions=[0.5,0.5]", "train.saes[0] (trainer_0).group_fractions and group_weights are for arch matryoshka"),
    ("train.lr=0", "train.lr must be > 0"),
    ("train.lr=-1e-4", "train.lr must be > 0"),
    ("train.saes[0].k=1000", "train.saes[0] (trainer_0).k (1000) is larger than its width (512)"),
    ("train.saes=[]", "train.saes is empty: list the SAEs to train"),
    ("train.saes[0].name=../../evil", "train.saes[0].name '../../evil' must be one folder name"),
    ("train.saes[0].name=a/b", "train.saes[0].name 'a/b' must be one folder name"),
    ("train.saes[0].name=.", "train.saes[0].name '.' must be one folder name"),
    ("train.saes[0].name=''", "train.saes[0].name '' must be one folder name"),
    ("train.saes[0].name=checkpoint.pt", "train.saes[0].name 'checkpoint.pt' must be one folder name"),
    ("train.saes[1].name=Trainer_0", "train.saes names must be unique, ignoring case"),
    ("train.layers=[]", "train.layers is empty"),
    ("train.layers=[-1]", "train.layers entry -1 is negative"),
    ("train.decay_start=-1", "train.decay_start must be > 0"),
    ("train.k_anneal_steps=-0.5", "train.k_anneal_steps must be >= 0"),
    ("eval.num_tokens=0", "eval.num_tokens must be > 0 (got 0)"),
    ("eval.batch_size=-1", "eval.batch_size must be > 0"),
    ("threshold.method=median", "threshold.method must be one of ema, batch-min, l0"),
    ("threshold.num_tokens=0", "threshold.num_tokens must be > 0"),
    ("threshold.batch_size=0", "threshold.batch_size must be > 0"),
    ("export.formats=[onnx]", "export.formats entry must be one of dictionary_learning, saelens"),
    ("export.formats=[saelens,saelens]", "export.formats lists a format twice"),
    ("export.series_name=../x", "export.series_name '../x' must be one folder name"),
    ("model.num_layers=0", "model.num_layers must be > 0"),
]


@pytest.mark.parametrize("command", ["plan", "train", "run"])
@pytest.mark.parametrize("override,message", VALUE_MISTAKES, ids=[m[0] for m in VALUE_MISTAKES])
def test_every_command_refuses_a_bad_value_before_writing_anything(command, override, message, tmp_path, capsys):
    outputs = [f"collect.out={tmp_path / 'cache'}", f"train.out={tmp_path / 'saes'}", f"export.out={tmp_path / 'export'}"]
    err = refused(capsys, [command, str(DEMO), *outputs, override])
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_a_refused_run_leaves_earlier_outputs_intact(tmp_path, capsys):
    state = write(tmp_path, "pipeline.json", '{"recipe": "abc", "stages": {"collect": {"finished": "then"}}}')
    before = hashlib.sha256(state.read_bytes()).hexdigest()
    err = refused(capsys, ["run", str(DEMO), f"train.out={tmp_path}", "train.saes[0].name=../x"])
    assert "must be one folder name" in err
    assert hashlib.sha256(state.read_bytes()).hexdigest() == before and [p.name for p in tmp_path.iterdir()] == ["pipeline.json"]


def test_a_valid_edge_is_accepted():
    """The checks refuse only what cannot work: k = width, one group, zero weight on a group, all fine."""
    r = load_recipe(DEMO, ["train.saes[0].k=512", "train.saes[1].group_fractions=[1.0]", "train.saes[1].group_weights=[1]"])
    assert r.train.saes[0].k == r.train.saes[0].width
    r = load_recipe(DEMO, ["train.saes[1].group_weights=[0,1,1]", "train.saes[0].name=k-32_w512"])
    assert r.train.saes[1].group_weights == [0, 1, 1] and r.train.saes[0].name == "k-32_w512"


# --- train.layers in the plan ---------------------------------------------------------------------------

def test_plan_names_train_layers_out_of_range_or_not_collected(capsys):
    err = refused(capsys, ["plan", str(DEMO), "train.layers=[9]"])
    assert "train.layers entry 9 is out of range: the model has layers 0..3" in err and "collect.layers entry" not in err
    err = refused(capsys, ["run", str(DEMO), "--dry-run", "train.layers=[1]"])
    assert "train.layers [1] are not collected (collect.layers gives [2, 3])" in err


def test_plan_only_warns_about_train_layers_when_training_reads_another_cache(tmp_path):
    p = plan(load_recipe(DEMO, ["train.layers=[1]", f"train.cache={tmp_path / 'other'}"]))
    assert [s.layer for s in p.saes] == [1, 1, 1]  # the demo's three SAEs
    assert any(f"train.layers [1] are not in collect.layers ([2, 3]): train.cache {tmp_path / 'other'}" in w
               for w in p.warnings)
    with pytest.raises(WorkbenchError, match="train.layers"):
        plan(load_recipe(DEMO, ["train.layers=[1]", "train.cache=checkpoints/demo/cache"]))  # = collect.out
