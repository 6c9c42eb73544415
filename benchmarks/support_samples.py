r"""The analyses of "On Support Samples of Next Word Prediction" on the demo model.

    python benchmarks/support_samples.py          # -> results/support_samples.json, .png
    python benchmarks/support_samples.py --quick  # small model and corpus, ~3 min

1. Train the demo model from scratch (``launch/train.py --gin_file=train_demo.gin``,
   checkpoints every 400 steps; θ(0) is ``train.init_params`` with the run's seed).
2. A token index (``support.featurize_tokens``) of every target token of the first
   ``--passages`` corpus passages at the last checkpoint: the share of support samples
   at τ = 0.5 and 0.9 (paper: 54% on GPT-2 / wikitext-2 at its τ), Type-1 / Type-2
   memberships, and the spread of |S_v| over tokens (paper's Figure 1: most tokens
   have few support samples, a few have very many) as a plot.
3. Predicting support status (at τ = ``--label_tau``, last checkpoint) from features
   at earlier checkpoints (paper's §5, Figure 5): for ``--probe_tokens`` tokens drawn
   at random (split 8:1:1), a linear and an MLP classifier on (a) the last hidden state
   φ and (b) a randomly projected gradient of log p(y | x) (this package's featurizer,
   no optimizer correction, one example per token), at θ(0), each saved checkpoint
   and the last. Accuracy on the test split with its 95% Wilson interval, and the
   majority-class rate beside it.

Not here yet: the removal-retraining experiment (paper's Table 2) and per-layer
probing of non-support samples (Figure 6).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {
    'support_share': 0.54,
    'support_share_note': 'GPT-2 117M trained on wikitext-2 (2.37M samples), paper §3',
    'classifier_at_init': 0.80,
    'classifier_at_last': 0.85,
    'classifier_note': 'MLP on a 4096-dim random projection of the gradient, paper §5',
}


def train_model(workdir: str, quick: bool) -> str:
    """Trains the demo model (or a small one with --quick); returns its checkpoint dir."""
    ckpt = os.path.join(workdir, 'checkpoints')
    bindings = ['trackstar_jax.TrainConfig.checkpoint_every = 400']
    if quick:
        bindings = [
            'trackstar_jax.TrainConfig.num_steps = 120',
            'trackstar_jax.TrainConfig.checkpoint_every = 40',
            'trackstar_jax.TrainConfig.warmup_steps = 10',
            'train_lm.max_documents = 2000',
        ]
    cmd = [sys.executable, os.path.join(ROOT, 'launch', 'train.py'), '--gin_file=train_demo.gin',
           f'--workdir={workdir}'] + [f'--gin_bindings={b}' for b in bindings]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return ckpt


def _labels(tok, tau: float) -> np.ndarray:
    """Support status of every row at τ (some |α_{i,v}| ≥ τ)."""
    return (np.abs(tok.index.extra('alpha')) >= tau).any(axis=1)


def token_counts(tok, taus) -> dict[str, Any]:
    from trackstar_jax import support

    out = {}
    for tau in taus:
        s = support.summary(tok, tau)
        sizes = np.asarray(s.pop('support_set_sizes'))
        s['support_set_size_quantiles'] = {
            str(q): float(np.quantile(sizes[sizes > 0], q)) for q in (0.5, 0.9, 0.99)
        }
        s['sizes_sorted'] = sorted(sizes[sizes > 0].tolist(), reverse=True)
        out[str(tau)] = s
    return out


def figure1(counts: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for tau, s in counts.items():
        sizes = s['sizes_sorted']
        ax.loglog(np.arange(1, len(sizes) + 1), sizes, label=f'τ = {tau}')
    ax.set_xlabel('token v, by |S_v| (rank)')
    ax.set_ylabel('support samples |S_v|')
    ax.set_title('Support samples per token (paper Fig. 1)')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def probe_features(model, params, opt_state, examples, rows, idx, spec, workdir, name):
    """(φ [n, d], projected ∇ log p [n, D]) of the probe tokens at these params."""
    from trackstar_jax import grads, pipeline, support

    tok_url = os.path.join(workdir, f'probe_phi_{name}')
    cfg = support.SupportConfig(seq_len=128, batch_size=16)
    phi_idx = support.featurize_tokens(model, params, examples, tok_url, cfg)
    assert phi_idx.ids == idx.ids
    phi = phi_idx.read(np.sort(rows))
    order = np.argsort(np.argsort(rows))
    phi = phi[order]
    # One example per probe token: its prefix, mask only on it.
    by_id = {ex['id']: ex for ex in examples}
    per_token = []
    for r in rows:
        ex_id, pos = support.split_row_id(idx.ids[r])
        toks = np.asarray(by_id[ex_id]['tokens'])[: pos + 1]
        mask = np.zeros(len(toks), np.float32)
        mask[pos] = 1.0
        per_token.append({'id': idx.ids[r], 'tokens': toks, 'loss_mask': mask})
    feat = grads.Featurizer(model, params, spec, opt_state=opt_state)
    g_idx = pipeline.featurize(feat, per_token, os.path.join(workdir, f'probe_grad_{name}'),
                               pipeline.IndexConfig(seq_len=128, batch_size=16))  # fmt: skip
    return phi, g_idx.read(slice(0, len(g_idx)))


def classify(x: np.ndarray, y: np.ndarray, split: np.ndarray, hidden: int, seed: int) -> float:
    """Test accuracy of a logistic (hidden = 0) or one-hidden-layer MLP classifier trained
    with Adam on the train split, the epoch picked on the validation split."""
    import jax
    import jax.numpy as jnp
    import optax

    mu, sd = x[split == 0].mean(0), x[split == 0].std(0) + 1e-6
    x = ((x - mu) / sd).astype(np.float32)
    key = jax.random.PRNGKey(seed)
    d = x.shape[1]
    if hidden:
        k1, k2 = jax.random.split(key)
        params = {'w1': jax.random.normal(k1, (d, hidden)) / np.sqrt(d), 'b1': jnp.zeros(hidden),
                  'w2': jax.random.normal(k2, (hidden,)) / np.sqrt(hidden), 'b2': 0.0}  # fmt: skip
    else:
        params = {'w': jnp.zeros(d), 'b': 0.0}

    def logits(p, xb):
        if hidden:
            return jax.nn.gelu(xb @ p['w1'] + p['b1']) @ p['w2'] + p['b2']
        return xb @ p['w'] + p['b']

    def loss(p, xb, yb):
        return optax.sigmoid_binary_cross_entropy(logits(p, xb), yb).mean() + 1e-4 * sum(
            jnp.sum(v**2) for v in jax.tree_util.tree_leaves(p)
        )

    tx = optax.adam(1e-3)
    state = tx.init(params)

    @jax.jit
    def step(p, s, xb, yb):
        g = jax.grad(loss)(p, xb, yb)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    acc = jax.jit(lambda p, xb, yb: jnp.mean((logits(p, xb) > 0) == (yb > 0.5)))
    xt, yt = jnp.asarray(x[split == 0]), jnp.asarray(y[split == 0], jnp.float32)
    rng = np.random.default_rng(seed)
    best_val, best_test = -1.0, 0.0
    for _ in range(40):
        perm = rng.permutation(len(xt))
        for b in range(0, len(perm), 128):
            i = perm[b : b + 128]
            params, state = step(params, state, xt[i], yt[i])
        val = float(acc(params, x[split == 1], y[split == 1].astype(np.float32)))
        if val > best_val:
            best_val = val
            best_test = float(acc(params, x[split == 2], y[split == 2].astype(np.float32)))
    return best_test


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson interval of an accuracy p measured on n examples."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(centre - half), float(centre + half)]


def figure5(probes: list[dict[str, Any]], majority: float, path: str) -> None:
    """Test accuracy against checkpoint for each feature x classifier (paper Fig. 5)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [p['step'] for p in probes]
    for key in [k for k in probes[0] if '/' in k and not k.endswith('_ci')]:
        y = [p[key] for p in probes]
        lo = [p[key] - p[key + '_ci'][0] for p in probes]
        hi = [p[key + '_ci'][1] - p[key] for p in probes]
        ax.errorbar(x, y, yerr=[lo, hi], marker='o', capsize=3, label=key)
    ax.axhline(majority, color='grey', ls=':', label='majority class')
    ax.set_xlabel('checkpoint step (0 = initialisation)')
    ax.set_ylabel('test accuracy')
    ax.set_title('Predicting support status at the last checkpoint (paper Fig. 5)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All analyses; returns the results dict."""
    from trackstar_jax import checkpoint, grads, support, train
    from trackstar_jax import sharding as shd
    from trackstar_jax.data import corpus as corpus_lib
    from trackstar_jax.data import examples as examples_lib
    from trackstar_jax.jobs.common import load_model

    t0 = time.time()
    work = args.workdir
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(work, 'checkpoints')
    if not os.path.isdir(ckpt) or checkpoint.latest_step(ckpt) is None:
        ckpt = train_model(work, args.quick)
    mesh = shd.make_mesh()
    steps = sorted(int(p) for p in os.listdir(ckpt) if p.isdigit())
    last = load_model(ckpt, mesh, steps[-1])
    tokenizer = corpus_lib.Tokenizer()
    records = corpus_lib.load_corpus(limit=args.passages)
    examples = examples_lib.corpus_examples(records, tokenizer, 128)
    cfg = support.SupportConfig(seq_len=128, batch_size=16)
    idx = support.featurize_tokens(last.model, last.params, examples,
                                   os.path.join(work, 'tokens_last'), cfg)  # fmt: skip
    tok = support.TokenIndex(idx)
    counts = token_counts(tok, (0.5, 0.9))
    prefix = 'support_samples_quick' if args.quick else 'support_samples'
    figure1(counts, os.path.join(harness.RESULTS_DIR, f'{prefix}_fig1.png'))

    # Probing support status from earlier checkpoints.
    labels = _labels(tok, args.label_tau)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(idx), size=min(args.probe_tokens, len(idx)), replace=False)
    y = labels[rows]
    split = rng.choice(3, size=len(rows), p=[0.8, 0.1, 0.1])
    spec = grads.GradientSpec(block_dim=args.probe_block_dim, num_layer_blocks=4,
                              correction='none')  # fmt: skip
    init_params = train.init_params(last.model, 128, mesh, last.train_config.seed)
    points = [('init', 0, init_params)] + [(f'step{s}', s, None) for s in steps]
    probes = []
    for name, step, params in points:
        if params is None:
            m = load_model(ckpt, mesh, step)
            params = m.params
        phi, grad = probe_features(last.model, params, None, examples, rows, idx, spec, work,
                                   name)  # fmt: skip
        entry = {'checkpoint': name, 'step': step}
        for feat_name, x in (('last_hidden', phi), ('gradient', grad)):
            for clf, hidden in (('linear', 0), ('mlp', 256)):
                acc = classify(x, y, split, hidden, seed=0)
                entry[f'{feat_name}/{clf}'] = acc
                entry[f'{feat_name}/{clf}_ci'] = wilson(acc, int((split == 2).sum()))
        probes.append(entry)
        print(f'[support] {name}: ' + ', '.join(f'{k} {v:.3f}' for k, v in entry.items()
                                                 if '/' in k and not k.endswith('_ci')),
              flush=True)  # fmt: skip
    majority = float(max(y[split == 2].mean(), 1 - y[split == 2].mean()))
    prefix = 'support_samples_quick' if args.quick else 'support_samples'
    figure5(probes, majority, os.path.join(harness.RESULTS_DIR, f'{prefix}_fig5.png'))
    return {
        'benchmark': 'support_samples',
        'quick': args.quick,
        'model': last.model.config.to_dict(),
        'checkpoint_steps': steps,
        'passages': len(records),
        'counts': {
            t: {k: v for k, v in c.items() if k != 'sizes_sorted'} for t, c in counts.items()
        },  # fmt: skip
        'probe': {
            'label_tau': args.label_tau,
            'tokens': int(len(rows)),
            'split_sizes': [int((split == i).sum()) for i in range(3)],
            'support_rate': float(y.mean()),
            'majority_test_accuracy': majority,
            'gradient_dim': int(grad.shape[1]),
            'gradient_feature': 'projected ∇ log p(y|x) (paper: ∇ p(y|x)), no optimizer '
            'correction, not unit-normalised',
            'by_checkpoint': probes,
        },
        'paper': PAPER,
        'figures': [f'{prefix}_fig1.png', f'{prefix}_fig5.png'],
        'wall_seconds': time.time() - t0,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--workdir', default='/tmp/support_samples_bench')
    parser.add_argument('--passages', type=int, default=8192)
    parser.add_argument('--probe_tokens', type=int, default=6000)
    parser.add_argument('--probe_block_dim', type=int, default=256)
    parser.add_argument('--label_tau', type=float, default=0.9)
    parser.add_argument('--out', default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.passages, args.probe_tokens = min(args.passages, 1000), min(args.probe_tokens, 1500)
    res = run(args)
    out = args.out or os.path.join(
        harness.RESULTS_DIR, 'support_samples_quick.json' if args.quick else 'support_samples.json'
    )
    harness.write_result(out, res)
    print(json.dumps({k: res[k] for k in ('counts', 'probe')}, indent=1)[:4000])
    print(f'results: {out}')


if __name__ == '__main__':
    main()
