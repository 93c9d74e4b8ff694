"""SAE workbench: residual-stream activations -> HDF5 cache -> BatchTopK / Matryoshka SAEs -> exports.

The pipeline, one module (or package) per stage:
    config      recipes (OmegaConf YAML validated against dataclasses)
    embedded    the tiny local models and tokenizers used by the demo and the tests
    data        text -> token rows (packed or padded)
    model       loading a causal LM and hooking decoder-layer outputs (resid_post)
    sink        the attention-sink filter (the one implementation)
    collect     model -> activations -> HDF5 shards, under Accelerate
    cache       reading the HDF5 cache (ActivationCache)
"""

from workbench.errors import WorkbenchError

__version__ = "0.1.0"
__all__ = ["WorkbenchError", "__version__"]
