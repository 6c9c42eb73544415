"""trackstar_jax: TrackStar training-data attribution for JAX/Flax LMs on TPU/GPU pods."""

__version__ = '0.1.0'
