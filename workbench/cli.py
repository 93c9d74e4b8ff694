"""The command line: a thin layer over the Python API.

    workbench collect RECIPE [key=value ...]     activations -> HDF5 cache
    workbench inspect CACHE [--verify]           what a cache holds, with its sink statistics
    workbench train RECIPE [key=value ...]       HDF5 cache -> BatchTopK / Matryoshka SAEs
    workbench run RECIPE [key=value ...]         the whole pipeline, each stage resumed or skipped when done
    workbench plan RECIPE [key=value ...]        what a recipe means (layers, tokens, disk, steps, paths), offline
    workbench eval SAE|RUN [RECIPE] [k=v ...]    LM loss with the SAE(s) spliced in (frac_recovered, KL)
    workbench threshold SAE [--method ...]       the JumpReLU threshold (ema | batch-min | l0), written into the SAE
    workbench export RUN --to FMT --out DIR      every SAE of a training run, with a model card
    workbench convert SRC --to FMT --out DST     one SAE folder, dictionary_learning <-> SAELens, exactly
    workbench verify DIR [--cache CACHE]         each SAE against its reference library (separate process)
    workbench features SAE --out DIR             each latent's top examples and sink report, as static HTML
    workbench status RECIPE|RUN                  where a pipeline stands: each stage, step, ETA, disk, last error
    workbench upload EXPORT --repo-id OWNER/NAME an export folder to the hub, in its published layout
    workbench attribute RECIPE SAE --prompt TEXT --target TOKEN --out DIR   sink-safe attribution patching

An SAE folder argument may also be a hub reference, hf://OWNER/NAME[@REVISION]/PATH (workbench.hub).

Every command takes --progress-every SECONDS: the interval of the plain progress lines written when
stderr is not a terminal (a log file), default 30 (the WORKBENCH_PROGRESS_EVERY environment variable).

User errors (WorkbenchError, a command line argparse refuses included) print one line and exit 2;
anything else keeps its traceback. Dotlist overrides may come anywhere after the command
(`workbench run RECIPE --dry-run train.saes[0].k=32`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from workbench.errors import WorkbenchError


class UsageError(WorkbenchError):
    """A command line that argparse refuses; `prog` is the (sub)command it concerns."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse with each error as one line (a UsageError: exit 2, no usage block) and, with
    intermixed=True, positionals (the dotlist overrides) accepted before, between and after options."""

    def __init__(self, *args, intermixed: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.intermixed = intermixed

    def parse_known_args(self, args=None, namespace=None):
        if not self.intermixed:
            return super().parse_known_args(args, namespace)
        self.intermixed = False  # parse_known_intermixed_args calls parse_known_args itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self.intermixed = True

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, f"{message}; see {self.prog} --help")


# argparse types. A 0 or an empty string must be refused here: the API reads them as "use the default".

def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {value})")
    return value


def _count(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (got {text})")
    return value


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _stages(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in text.split(","))
    if not all(stages):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty stage name; give e.g. collect,train")
    return stages


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (e.g. recipes/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. collect.batch_size=8 train.saes[0].k=32")


def cmd_collect(args: argparse.Namespace) -> int:
    from workbench.collect import collect
    from workbench.config import load_recipe

    collect(load_recipe(args.recipe, args.overrides))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from workbench.config import load_recipe
    from workbench.training import train

    train(load_recipe(args.recipe, args.overrides))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from workbench.cache.inspect import describe

    print(describe(args.cache, top=args.top, check=args.verify))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from workbench.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from workbench.plan import plan, render

        print(render(plan(recipe, args.recipe)))
        return 0
    from workbench.pipeline import STAGES, run

    if (args.collect_devices is None) != (args.train_devices is None):
        raise WorkbenchError("give both --collect-devices and --train-devices (e.g. 0,1,2,3,4,5 and 6,7), or neither")
    devices = None if args.collect_devices is None else (args.collect_devices, args.train_devices)
    if devices is not None and recipe.collect.max_shards_on_disk is None:
        raise WorkbenchError("--collect-devices and --train-devices split the GPUs between collection and training, which "
                             "run at the same time only with a bounded cache: set collect.max_shards_on_disk")
    run(recipe, args.recipe, list(args.overrides), args.stages if args.stages is not None else STAGES, devices)
    return 0


def _run_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p)
    p.add_argument("--dry-run", action="store_true", help="print what the recipe means (layers, tokens, disk, "
                                                          "steps, paths) without loading weights, and stop")
    p.add_argument("--stages", type=_stages, help="comma-separated subset of collect,train,threshold,eval,export,verify,features")
    p.add_argument("--collect-devices", type=_devices, help="with collect.max_shards_on_disk: the CUDA devices collection "
                                                           "runs on, one process each (e.g. 0,1,2,3,4,5)")
    p.add_argument("--train-devices", type=_devices, help="with collect.max_shards_on_disk: the CUDA devices training runs "
                                                         "on, one process each (e.g. 6,7)")


def _devices(text: str) -> str:
    parts = text.split(",")
    if not all(p.strip().isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of distinct CUDA device numbers, e.g. 0,1")
    return ",".join(p.strip() for p in parts)


def cmd_plan(args: argparse.Namespace) -> int:
    from workbench.config import load_recipe
    from workbench.plan import plan, render

    print(render(plan(load_recipe(args.recipe, args.overrides), args.recipe)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from workbench.evaluate import evaluate_folders, render

    rest = list(args.rest)
    recipe = rest.pop(0) if rest and "=" not in rest[0] else None
    for folder, results in evaluate_folders(args.sae, recipe, rest, write=not args.no_write).items():
        print(f"{folder}\n{render(results)}\n")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sae", help="a dictionary_learning SAE folder (ae.pt + config.json), or a run directory "
                               "(train.out): every SAE under it, with one model load; or hf://OWNER/NAME[@REVISION]/PATH "
                               "(nothing is written into the hub cache)")
    p.add_argument("rest", nargs="*", metavar="[RECIPE] [key=value ...]",
                   help="the recipe the SAE was trained with (text, model dtype, eval section; default: built-in "
                        "defaults with the SAE's trainer.lm_name), then dotlist overrides, e.g. eval.num_tokens=4096")
    p.add_argument("--no-write", action="store_true", help="print only; do not merge into eval_results.json")


def cmd_threshold(args: argparse.Namespace) -> int:
    from workbench.threshold import calibrate, render

    print(render(calibrate(args.sae, cache=args.cache, method=args.method, batch_size=args.batch_size,
                           num_tokens=args.num_tokens, device=args.device, write=not args.no_write)))
    return 0


def _threshold_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sae", help="a BatchTopK / Matryoshka SAE folder (ae.pt + config.json)")
    p.add_argument("--cache", type=_text, help="activation cache with the SAE's layer (default: the one in its config.json)")
    p.add_argument("--method", choices=("ema", "batch-min", "l0"), help="which threshold to write (default: l0)")
    p.add_argument("--batch-size", type=_positive_int, help="tokens per batch (default: the SAE's training batch)")
    p.add_argument("--num-tokens", type=_positive_int, help="held-out tokens to use (default: 50000)")
    p.add_argument("--device", type=_text, help="default: cuda when available, else cpu")
    p.add_argument("--no-write", action="store_true", help="report only; leave the SAE unchanged")


def cmd_export(args: argparse.Namespace) -> int:
    from workbench.export import export_run

    saes = export_run(args.run, args.to, args.out, allow_uncalibrated=args.allow_uncalibrated, series_name=args.series)
    for sae in saes:
        print(f"{sae.source} -> {sae.folder}")
    print(f"exported {len(saes)} SAEs to {args.out} (model card: {args.out}/README.md)")
    return 0


def _target_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """--to and --out, shared by export and convert."""
    p.add_argument("--to", required=True, choices=("saelens", "dictionary_learning"))
    p.add_argument("--out", required=True, type=_text, help=out_help)


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a training run's output folder (train.out)")
    _target_args(p, "export folder")
    p.add_argument("--series", type=_text, help="dictionary_learning series folder name (default: saes_<model>_batch_top_k)")
    p.add_argument("--allow-uncalibrated", action="store_true", help="export SAEs whose threshold is still -1")


def cmd_convert(args: argparse.Namespace) -> int:
    from workbench.formats.convert import convert_explained

    written, reason = convert_explained(args.src, args.to, args.out, k=args.k)
    print(f"{args.src} -> {args.out}: wrote {args.to} {written}: {reason}")
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="an SAE folder in either format (detected), or hf://OWNER/NAME[@REVISION]/PATH")
    _target_args(p, "destination folder")
    p.add_argument("--k", type=_positive_int, help="the training k, for a SAELens jumprelu SAE that does not record it")


def cmd_verify(args: argparse.Namespace) -> int:
    from workbench.hub import resolve_sae_path
    from workbench.verify import format_report, verify

    root = resolve_sae_path(args.dir)
    checks = verify(root, cache=args.cache, tolerance=args.tolerance)
    print(format_report(checks, root))
    return 0 if all(c.ok for c in checks) else 1


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a folder of SAE folders (either format), searched recursively, or hf://OWNER/NAME[@REVISION]/PATH")
    p.add_argument("--cache", type=_text, help="also compare on real activations from this cache")
    p.add_argument("--tolerance", type=_tolerance, default=1e-5,
                   help="max difference, relative to the magnitude of the terms each output sums (default: 1e-5)")


def cmd_features(args: argparse.Namespace) -> int:
    from workbench.config import load_recipe
    from workbench.features import build_features

    model = load_recipe(args.recipe).model if args.recipe is not None else None
    results = build_features(args.sae, args.out, cache=args.cache, top=args.top, window=args.window, model=model,
                             layer=args.layer)
    for r in results:
        print(f"{r.folder} -> {r.out}/index.html: {r.width} latents, {r.dead} never fire on the {r.kept_tokens:,} kept "
              f"tokens, {r.flagged} flagged (max on the {r.sink_tokens:,} sink tokens above the kept max)")
    return 0


def _features_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sae", help="an SAE folder (either format), or a folder of them (train.out, an export), or "
                               "hf://OWNER/NAME[@REVISION]/PATH")
    p.add_argument("--out", required=True, type=_text, help="folder for features.json and the HTML pages")
    p.add_argument("--cache", type=_text, help="activation cache with the SAE's layer (default: the one it records)")
    p.add_argument("--top", type=_positive_int, default=20, help="top activating tokens per latent (default: 20)")
    p.add_argument("--window", type=_count, default=8, help="context tokens either side of an example (default: 8)")
    p.add_argument("--recipe", type=_text, help="the recipe of the cache's model: adds output-token effects")
    p.add_argument("--layer", type=_count, help="the cache layer, for an SAE that records none")


def cmd_status(args: argparse.Namespace) -> int:
    from workbench.status import render, status

    print(render(status(args.target, args.overrides)))
    return 0


def _status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="RECIPE|RUN", help="a recipe YAML (with its overrides), or a run folder (train.out)")
    p.add_argument("overrides", nargs="*", help="the dotlist overrides the pipeline was run with")


def cmd_upload(args: argparse.Namespace) -> int:
    from workbench.upload import check_repo_id, plan_upload, render, upload

    check_repo_id(args.repo_id)
    if args.dry_run:
        print(render(plan_upload(args.export), args.repo_id, args.revision))
        return 0
    print(f"uploaded {args.export} to {upload(args.export, args.repo_id, args.revision, args.private)}")
    return 0


def _upload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("export", help="a folder `workbench export --out` wrote (one format: dictionary_learning or saelens)")
    p.add_argument("--repo-id", required=True, type=_text, help="the hub model repo, OWNER/NAME (created when missing)")
    p.add_argument("--revision", type=_text, help="the branch to commit to (created when missing; default: main)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--dry-run", action="store_true", help="print each file and its repo path; send nothing")


def cmd_attribute(args: argparse.Namespace) -> int:
    from workbench.attribution import HEATMAP_FILE, REPORT_FILE, attribute_command

    doc = attribute_command(args.recipe, args.sae, args.prompt, args.target, args.baseline, args.out,
                            features=args.features, top=args.top, layer=args.layer)
    best = doc["top"][0] if doc["top"] else None
    print(f"{args.out}/{REPORT_FILE}, {args.out}/{HEATMAP_FILE}: metric {doc['metric']['value']:.4g}; "
          f"{len(doc['excluded'])} tokens excluded by the filter"
          + (f"; top latent {best['latent']} at position {best['position']} ({best['token']!r}): {best['attribution']:.4g}"
             if best else ""))
    return 0


def _attribute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="the recipe of the SAE's model (its model section is used)")
    p.add_argument("sae", help="one SAE folder (either format) or hf://OWNER/NAME[@REVISION]/PATH")
    p.add_argument("--prompt", required=True, type=_text, help="the text to attribute")
    p.add_argument("--target", required=True, help="the target token (one token, e.g. ' Paris' with its space)")
    p.add_argument("--baseline", help="the baseline token: the metric is logit(target) - logit(baseline) at the last "
                                      "position (default: logit(target))")
    p.add_argument("--out", required=True, type=_text, help="folder for attribution.json and attribution.png")
    p.add_argument("--features", type=_text, help="the SAE's feature-page folder (`workbench features --out`): links "
                                                  "each latent to its page")
    p.add_argument("--top", type=_positive_int, default=20, help="top attributions listed and plotted (default: 20)")
    p.add_argument("--layer", type=_count, help="the decoder layer, for an SAE that records none")


def _interval(text: str) -> float:
    value = _tolerance(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be above 0 seconds")
    return value


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache")
    p.add_argument("--top", type=_count, default=10, help="most frequent sink tokens to list")
    p.add_argument("--verify", action="store_true", help="read every shard and check every block against its "
                                                         "checksum (a corrupt shard: exit 2, naming it)")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, Callable[[argparse.ArgumentParser], None]]] = {
    "collect": (cmd_collect, "collect resid_post activations into an HDF5 cache", _recipe_args),
    "train": (cmd_train, "train BatchTopK / Matryoshka SAEs from the cache (train section)", _recipe_args),
    "inspect": (cmd_inspect, "summarise a cache, with its sink statistics", _inspect_args),
    "run": (cmd_run, "the whole pipeline: collect, train, threshold, eval, export, verify, features (resumable)", _run_args),
    "plan": (cmd_plan, "what a recipe means, without loading weights (the dry run)", _recipe_args),
    "eval": (cmd_eval, "the model's loss with an SAE spliced in at its layer", _eval_args),
    "threshold": (cmd_threshold, "derive, compare and write the JumpReLU threshold of an SAE", _threshold_args),
    "export": (cmd_export, "export every SAE of a training run (dictionary_learning or SAELens) with a model card",
               _export_args),
    "convert": (cmd_convert, "convert one SAE folder between dictionary_learning and SAELens", _convert_args),
    "verify": (cmd_verify, "check SAE folders against their reference library", _verify_args),
    "features": (cmd_features, "max-activating examples, statistics and sink report of every latent, as HTML",
                 _features_args),
    "status": (cmd_status, "where a pipeline stands: each stage done, running or not, its step and ETA, disk, last error",
               _status_args),
    "upload": (cmd_upload, "upload an export folder (either format, with its model card) to a hub model repo",
               _upload_args),
    "attribute": (cmd_attribute, "attribution patching of an SAE's latents on a prompt, sinks and first tokens "
                                 "excluded as in training", _attribute_args),
}


# Commands whose positionals end in dotlist overrides: those may come anywhere after the command.
WITH_OVERRIDES = ("collect", "train", "run", "plan", "eval", "status")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="workbench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (func, help_text, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, intermixed=name in WITH_OVERRIDES)
        add_args(p)
        p.add_argument("--progress-every", type=_interval, metavar="SECONDS",
                       help="seconds between progress lines when stderr is not a terminal (default: 30, or "
                            "$WORKBENCH_PROGRESS_EVERY)")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args, extra = build_parser().parse_known_args(argv)
        prog = f"workbench {args.command}" if args.command else "workbench"
        if extra:  # named here, not by the top-level parser, so that the message names the command
            raise UsageError(prog, f"unrecognized arguments: {' '.join(extra)}; see {prog} --help")
        if args.command is None:
            raise UsageError(prog, f"name a command: {', '.join(COMMANDS)}; see workbench --help")
    except UsageError as err:
        print(f"{err.prog}: error: {err}", file=sys.stderr)
        return 2
    from workbench.progress import ENV, quiet_library_bars

    quiet_library_bars()
    if args.progress_every is not None:  # the environment reaches every process and stage that draws progress
        os.environ[ENV] = repr(args.progress_every)
    from workbench.dist import close_process_group

    code = 1  # an exception of any other kind propagates with it
    try:
        code = args.func(args)
    except WorkbenchError as err:
        print(f"workbench {args.command}: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"workbench {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        code = 130
    finally:
        close_process_group(ok=code == 0)
    return code
