"""Models the engine attributes. Any Flax linen LM works; these are the built-in ones."""

from trackstar_jax.models.decoder import DecoderConfig, DecoderLM
from trackstar_jax.models.llama import LlamaConfig, LlamaLM

__all__ = ['DecoderConfig', 'DecoderLM', 'LlamaConfig', 'LlamaLM']
