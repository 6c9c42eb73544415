"""Per-example gradient features: blocks, projection, correction and the fused kernel."""

from trackstar_jax.grads.featurizer import Featurizer, GradientSpec
from trackstar_jax.grads.layout import Layout, ParamEntry
from trackstar_jax.grads.second_moments import estimate_second_moments

__all__ = ['Featurizer', 'GradientSpec', 'Layout', 'ParamEntry', 'estimate_second_moments']
