"""Models the engine attributes. Any Flax linen LM works; these are the built-in ones."""

from trackstar_jax.models.decoder import DecoderConfig, DecoderLM

__all__ = ['DecoderConfig', 'DecoderLM']
