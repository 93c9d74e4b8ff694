"""The SAE architectures a recipe can name (`train.saes[].arch`), one `Architecture` record each.

A record holds everything that differs between the architectures outside their modules: the module
class and how a recipe's width, k and group fractions build it, the recipe keys it accepts, what
dictionary_learning and SAELens call it, its name on a model card, and the size of its weights on
disk. Everything else looks an architecture up here (by recipe name, by dictionary_learning class,
or by module) instead of comparing names:

    name        module                  dictionary_learning                                  SAELens training_architecture
    batchtopk   BatchTopKSAE            BatchTopKSAE / BatchTopKTrainer                      batchtopk
    matryoshka  MatryoshkaBatchTopKSAE  MatryoshkaBatchTopKSAE / MatryoshkaBatchTopKTrainer  matryoshka_batchtopk
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.sae.modules import SAE, BatchTopKSAE, MatryoshkaBatchTopKSAE, matryoshka_group_sizes

SAE_KEYS = ("name", "arch", "width", "k")  # what every architecture's train.saes entry has
GROUP_KEYS = ("group_fractions", "group_weights")  # the nested groups' recipe keys


@dataclass(frozen=True)
class Architecture:
    name: str  # train.saes[].arch, and workbench.arch in an SAE's config.json
    module: type[SAE]
    dict_class: str  # dictionary_learning's class: config.json trainer.dict_class
    trainer_class: str  # dictionary_learning's trainer: config.json trainer.trainer_class
    saelens_architecture: str  # SAELens' metadata.training_architecture
    display_name: str  # the model card's architecture column
    # Latents in nested groups (Matryoshka): the recipe gives group_fractions (and group_weights), the
    # module holds group_sizes, and the training loss averages each group prefix's weighted loss.
    grouped: bool

    @property
    def recipe_keys(self) -> tuple[str, ...]:
        """The keys a train.saes entry of this architecture may set."""
        return SAE_KEYS + (GROUP_KEYS if self.grouped else ())

    def group_sizes(self, width: int, group_fractions: list[float] | None) -> list[int] | None:
        """The groups' latent counts for a recipe's width and group_fractions; None for an ungrouped SAE."""
        return matryoshka_group_sizes(width, list(group_fractions)) if self.grouped else None

    def build(self, activation_dim: int, width: int, k: int, group_fractions: list[float] | None = None) -> SAE:
        """A freshly initialised module (it draws from torch's global RNG) for a train.saes entry."""
        sizes = self.group_sizes(width, group_fractions)
        return self.module(activation_dim, width, k) if sizes is None else self.module(activation_dim, width, k, sizes)

    def weights_bytes(self, d_model: int, width: int, group_sizes: list[int] | None) -> int:
        """Bytes of ae.pt's tensors: float32 W_enc, W_dec, b_enc, b_dec, k and threshold, int64 group_sizes."""
        params = 2 * d_model * width + width + d_model + 2
        return 4 * params + 8 * len(group_sizes or [])


BATCHTOPK = Architecture(
    name="batchtopk", module=BatchTopKSAE, dict_class="BatchTopKSAE", trainer_class="BatchTopKTrainer",
    saelens_architecture="batchtopk", display_name="BatchTopK", grouped=False)
MATRYOSHKA = Architecture(
    name="matryoshka", module=MatryoshkaBatchTopKSAE, dict_class="MatryoshkaBatchTopKSAE",
    trainer_class="MatryoshkaBatchTopKTrainer", saelens_architecture="matryoshka_batchtopk",
    display_name="Matryoshka BatchTopK", grouped=True)

ARCHITECTURES = {a.name: a for a in (BATCHTOPK, MATRYOSHKA)}
BY_DICT_CLASS = {a.dict_class: a for a in ARCHITECTURES.values()}


def architecture_of(sae: SAE) -> Architecture:
    """The record of a module's architecture."""
    return next(a for a in ARCHITECTURES.values() if type(sae) is a.module)


def holding(group_sizes: list[int] | None) -> Architecture:
    """The architecture that holds a JumpReLU SAE with one threshold and a training k exactly: the grouped
    one when it has group sizes (None or [] for none)."""
    return next(a for a in ARCHITECTURES.values() if a.grouped == bool(group_sizes))
