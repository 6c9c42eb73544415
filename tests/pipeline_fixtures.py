"""A tiny model, featurizer and example sets shared by the pipeline tests and workers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trackstar_jax import grads, losses  # noqa: F401 (grads re-exported)
from trackstar_jax.models import DecoderConfig, DecoderLM

CFG = DecoderConfig(
    vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=1, mlp_dim=48, max_len=16
)
SEQ_LEN = 16


def trained(cfg: DecoderConfig, steps: int = 2, seed: int = 0, min_dim: int = 16):
    """A model after a few real Adafactor steps, with its (non-trivial) optimizer state."""
    model = DecoderLM(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32)))
    params = params['params']
    tx = optax.adafactor(1e-2, min_dim_size_to_factor=min_dim)
    state = tx.init(params)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 12)))
        mask = jnp.ones((4, 12)).at[:, 0].set(0)
        g = jax.grad(
            lambda p, t=toks, m=mask: losses.mean_token_loss(model.apply({'params': p}, t), t, m)
        )(params)
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return model, params, state


def model_and_state(seed: int = 0):
    """The shared tiny LM after two Adafactor steps, with its optimizer state."""
    return trained(CFG, steps=2, seed=seed)


SPEC = grads.GradientSpec(block_dim=16, num_layer_blocks=2, seed=3)


def featurizer(mesh=None, spec=SPEC):
    model, params, state = model_and_state()
    return grads.Featurizer(model, params, spec, opt_state=state, mesh=mesh)


def train_examples(n: int = 45, seed: int = 1):
    """Training examples of varied lengths: every token after the first is a target."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(2, SEQ_LEN + 1))
        mask = np.ones(length, np.float32)
        mask[0] = 0
        out.append(
            {
                'id': f'train-{(i * 7919) % 1000:04d}-{i}',
                'tokens': rng.integers(0, CFG.vocab_size, length),
                'loss_mask': mask,
            }
        )
    return out


def query_examples(n: int = 6, seed: int = 2):
    """Queries: a prompt and a completion-only mask."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        tokens = rng.integers(0, CFG.vocab_size, 12)
        mask = np.zeros(12, np.float32)
        mask[int(rng.integers(4, 10)) :] = 1
        out.append({'id': f'query-{i}', 'tokens': tokens, 'loss_mask': mask})
    return out


def build_index(
    feat, examples, path, chunk_rows, batch_size=None, seq_len=SEQ_LEN, dtype='float32', **kw
):
    """pipeline.featurize with the index settings spelled as the tests use them."""
    from trackstar_jax import pipeline

    config = pipeline.IndexConfig(
        seq_len=seq_len, batch_size=batch_size or chunk_rows, chunk_rows=chunk_rows, dtype=dtype
    )
    return pipeline.featurize(feat, examples, str(path), config, **kw)
