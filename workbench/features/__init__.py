"""Feature pages: each latent's max-activating examples, statistics and sink report, from the cache alone.

    from workbench.features import build_features
    build_features("checkpoints/demo/saes", out="checkpoints/demo/features", cache="checkpoints/demo/cache")

compute.py: the streaming pass and features.json's schema; effects.py: output-token effects through the
unembedding; site.py: the static HTML pages; build.py: the command, over every SAE under a folder.
"""

from workbench.features.build import FeaturesResult, build_features

__all__ = ["FeaturesResult", "build_features"]
