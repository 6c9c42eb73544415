"""TracIn-CP over one index per saved checkpoint against a float64 brute-force sum."""

import numpy as np
import pytest

from tests import pipeline_fixtures as fx
from trackstar_jax import grads, pipeline
from trackstar_jax.index import ManifestMismatchError

WEIGHTS = (0.3, 0.05, 0.7)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """Three checkpoints (2, 4 and 6 Adafactor steps), train examples in a different row
    order at each, with their train and query indices."""
    root = tmp_path_factory.mktemp('tracin')
    train_ex, query_ex = fx.train_examples(21), fx.query_examples(5)
    out = []
    for c, steps in enumerate((2, 4, 6)):
        model, params, state = fx.trained(fx.CFG, steps=steps)
        feat = grads.Featurizer(model, params, fx.SPEC, opt_state=state)
        order = np.random.default_rng(c).permutation(len(train_ex))
        train = fx.build_index(feat, [train_ex[i] for i in order], root / f'train{c}', chunk_rows=8)
        queries = fx.build_index(feat, query_ex, root / f'queries{c}', chunk_rows=8)
        out.append((train, queries))
    return out


def _brute_force(checkpoints, unit_norm):
    def rows(idx):
        v = np.asarray(idx.read(slice(0, len(idx))), np.float64)
        return v / np.linalg.norm(v, axis=1, keepdims=True) if unit_norm else v

    names = sorted(checkpoints[0][0].ids)
    total = 0.0
    for (train, queries), w in zip(checkpoints, WEIGHTS, strict=True):
        by_id = dict(zip(train.ids, rows(train), strict=True))
        total = total + w * rows(queries) @ np.stack([by_id[e] for e in names]).T
    return names, total  # [Q, E]


@pytest.mark.parametrize('unit_norm', [False, True])
def test_checkpoint_sum_equals_the_float64_brute_force(checkpoints, unit_norm):
    names, dense = _brute_force(checkpoints, unit_norm)
    cps = [pipeline.Checkpoint(t, q, w) for (t, q), w in zip(checkpoints, WEIGHTS, strict=True)]
    cfg = pipeline.ScoreConfig(k=6, opponents=3, unit_norm=unit_norm, chunk_rows=5)
    result = pipeline.score_checkpoints(cps, cfg)
    for q in range(len(dense)):
        order = sorted(range(len(names)), key=lambda j: (-dense[q, j], names[j]))
        assert result.ids[q] == [names[j] for j in order[:6]]
        np.testing.assert_allclose(result.scores[q], dense[q, order[:6]], rtol=1e-5, atol=1e-7)
        assert result.opponent_ids[q] == [names[j] for j in order[::-1][:3]]
    # One checkpoint is the plain unnormalised (or cosine) score at that checkpoint.
    train, queries = checkpoints[1]
    one = pipeline.score_checkpoints([pipeline.Checkpoint(train, queries, 1.0)], cfg)
    plain = pipeline.score(queries, train, None, cfg)
    assert one.ids == plain.ids
    np.testing.assert_allclose(one.scores, plain.scores, rtol=1e-5, atol=1e-7)


def test_refuses_mismatched_checkpoints(checkpoints, tmp_path):
    (t0, q0), (t1, q1), _ = checkpoints
    with pytest.raises(ManifestMismatchError, match='checkpoint 1'):
        pipeline.score_checkpoints(
            [pipeline.Checkpoint(t0, q0, 1.0), pipeline.Checkpoint(t1, q0, 1.0)]
        )
    with pytest.raises(ValueError, match='at least one'):
        pipeline.score_checkpoints([])
    with pytest.raises(ValueError, match='not finite'):
        pipeline.score_checkpoints([pipeline.Checkpoint(t0, q0, float('nan'))])
    model, params, state = fx.trained(fx.CFG, steps=4)
    feat = grads.Featurizer(model, params, fx.SPEC, opt_state=state)
    fewer = fx.build_index(feat, fx.train_examples(20), tmp_path / 'fewer', chunk_rows=8)
    with pytest.raises(ValueError, match='different examples'):
        pipeline.score_checkpoints(
            [pipeline.Checkpoint(t0, q0, 1.0), pipeline.Checkpoint(fewer, q1, 1.0)]
        )
