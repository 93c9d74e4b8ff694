"""SAE workbench: residual-stream activations -> HDF5 cache -> BatchTopK / Matryoshka SAEs -> exports.

`workbench run RECIPE` runs the stages in order (pipeline.py); each is also a command of its own (cli.py).

    collect     collect.py       a causal LM's decoder-layer outputs (model.py: loading, hooks; data.py:
                                 text -> token rows; embedded.py: the tiny local models) through the
                                 attention-sink filter into HDF5 shards, under Accelerate
    cache       cache/           the cache on disk: layout.py (the HDF5 layout, dtypes, checksums, the
                                 manifest and its statistics, the size formula `plan` uses), writer.py,
                                 reader.py (ActivationCache: shuffled, filtered reads), inspect.py
    train       training/        step.py (one SAE's update step and loss), loop.py (the lanes,
                                 checkpoints and resume, the SAE folders)
    threshold   threshold.py     the scalar JumpReLU threshold a BatchTopK SAE runs with per token
    eval        evaluate.py      the model's loss with an SAE spliced in (metrics.py: FVE, L0, ...)
    export      export.py        a run as a dictionary_learning series or SAELens folders, with a model
                                 card (model_card.py)
    verify      verify.py        each exported SAE against its reference library, run in its own
                                 process (verify_reference.py)
    features    features/        max-activating examples and feature pages from the cache

Shared by the stages:
    sink.py          the sink rule: which tokens are kept (the one keep mask); its default multiple,
                     DEFAULT_SINK_MULTIPLE, is defined with the recipe defaults (config.py loads no torch)
    sae/             the SAE modules (modules.py), sparse kernels (sparse.py) and the architecture
                     registry (registry.py): what is specific to BatchTopK or Matryoshka
    formats/         the checkpoint formats: one adapter per dictionary_learning class and per SAELens
                     architecture (dictionary_learning.py, saelens.py), the common SAEWeights (weights.py),
                     `workbench convert` (convert.py), output folders (output.py)
    provenance.py    the `workbench` section of an SAE's config: how the workbench made it
    config.py        recipes (OmegaConf YAML validated against dataclasses); plan.py: what one means
    dist.py          everything distributed (process state, devices, main-first, collectives)
    files.py         atomic writes, JSON reads, folder locks: every file the workbench writes
    inference.py     encoding with the sink filter, for users of the SAEs
"""

from workbench.errors import WorkbenchError

__version__ = "0.1.0"
__all__ = ["WorkbenchError", "__version__"]
