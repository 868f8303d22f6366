"""Named attack recipes: each module here (or in a plugin, see :mod:`dori.registry`) registers factories
``recipe(pipe, descriptor, references, *, initializer, seeds, generation, config, constraint) ->
EmbeddingAttack`` with :func:`register_recipe`; ``dori attack --recipe NAME`` builds one by name.

Arguments every recipe takes: ``descriptor`` (copy detection) and ``references`` (the target images,
uint8 ``(H, W, 3)``, indexed by ``AttackItem.index``); ``initializer``, ``constraint`` (parts of
:mod:`dori.attack.parts`, None for the recipe's own); ``seeds`` of the success check; ``generation``
(:class:`~dori.generation.GenerationConfig`) of its images; ``config``
(:class:`~dori.attack.loop.AttackConfig`).
"""

from __future__ import annotations

from ...registry import Registry

RECIPES: Registry = Registry("recipe", "dori.attack.recipes", "dori.recipes")
register_recipe = RECIPES.register
DEFAULT_RECIPE = "dori_kowalczuk2025"


def build_attack(name: str, pipe, descriptor, references, **parts):
    """The attack of the recipe ``name`` (see the module docstring for ``parts``)."""
    return RECIPES.get(name)(pipe, descriptor, references, **parts)


__all__ = ["RECIPES", "DEFAULT_RECIPE", "build_attack", "register_recipe"]
