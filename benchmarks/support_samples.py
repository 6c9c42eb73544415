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

4. Removing non-support samples (paper's Table 2): hard (support samples only), soft
   (each token kept with probability max_v |α|), random (as many tokens as hard) and
   the original set; (a) only an LM head retrained on the last checkpoint's φ, (b) the
   whole model trained from scratch on the subset (``--retrain_steps``). Test loss on
   held-out passages and support counts before → after, on the new and the original set.
5. Per-layer probing (paper's Figure 6): a new head fitted on each block's output, and
   the number of non-support samples under it, layer by layer, split by POS.
6. POS of the target tokens (paper's Figure 2): the share of support samples per
   part-of-speech tag. No tagger ships offline: tags are this package's rough
   out-of-context rules (``trackstar_jax.data.pos``: closed-class lists, WordNet lemmas
   of the embedded glosses through WordNet's suffix rules), not the paper's tagger.
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
    'support_share_by_pos': {'VERB': 0.86, 'PUNCT': 0.20},
    'support_share_by_pos_note': 'paper §3 text (Figure 2); its other bars are only drawn',
}
# The paper's two groups of tags (Figure 2): semantically rich vs light.
POS_GROUPS = {
    'rich': ('ADV', 'NUM', 'ADJ', 'VERB', 'NOUN'),
    'light': ('PART', 'AUX', 'DET', 'ADP', 'PUNCT'),
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


def row_tags(idx, examples, decode) -> np.ndarray:
    """The rough POS tag (``data.pos``) of every token row's target token."""
    from trackstar_jax import support
    from trackstar_jax.data import pos

    lexicon = pos.Lexicon.embedded()
    by_id = {ex['id']: ex for ex in examples}
    tags_of: dict[str, list[str]] = {}
    out = []
    for row_id in idx.ids:
        ex_id, position = support.split_row_id(row_id)
        if ex_id not in tags_of:
            tokens = [int(t) for t in by_id[ex_id]['tokens']]
            tags_of[ex_id] = pos.token_tags(tokens, decode, lexicon)
        out.append(tags_of[ex_id][position])
    return np.array(out)


def pos_shares(labels: np.ndarray, tags: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per tag: tokens, the share that are support samples, its 95% Wilson interval."""
    out = {}
    for tag in sorted(set(tags.tolist())):
        sel = tags == tag
        share = float(labels[sel].mean())
        out[tag] = {'tokens': int(sel.sum()), 'support_share': share,
                    'support_share_ci': wilson(share, int(sel.sum()))}  # fmt: skip
    for group, members in POS_GROUPS.items():
        sel = np.isin(tags, members)
        share = float(labels[sel].mean()) if sel.any() else float('nan')
        out[f'group:{group}'] = {'tokens': int(sel.sum()), 'support_share': share,
                                 'support_share_ci': wilson(share, int(sel.sum())),
                                 'tags': list(members)}  # fmt: skip
    return out


def figure2(shares: dict[str, dict[str, Any]], overall: float, tau: float, path: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    tags = sorted((t for t in shares if not t.startswith('group:') and shares[t]['tokens'] >= 50),
                  key=lambda t: shares[t]['support_share'])  # fmt: skip
    val = np.array([shares[t]['support_share'] for t in tags])
    ci = np.array([shares[t]['support_share_ci'] for t in tags])
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(tags) + 1.2))
    ax.barh(tags, val, xerr=[val - ci[:, 0], ci[:, 1] - val], color='tab:blue', capsize=2)
    ax.axvline(overall, color='k', ls='--', lw=1, label=f'all tokens {100 * overall:.1f}%')
    ax.set_xlabel(f'share of support samples (τ = {tau}), 95% interval')
    ax.set_title('Support samples by POS of the target (paper Fig. 2; rough tags)')
    ax.set_xlim(0, 1)
    ax.legend(loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure6(layers: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    tags = sorted({t for r in layers for t in r['non_support_by_pos']},
                  key=lambda t: -layers[-1]['non_support_by_pos'].get(t, 0))  # fmt: skip
    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    bottom = np.zeros(len(layers))
    x = [r['layer'] for r in layers]
    colors = plt.get_cmap('tab20').colors  # one colour per tag (up to 20)
    for i, tag in enumerate(tags):
        h = np.array([r['non_support_by_pos'].get(tag, 0) for r in layers])
        ax.bar(x, h, bottom=bottom, label=tag, color=colors[i % len(colors)])
        bottom += h
    ax.set_xlabel('layer (a new head on its output)')
    ax.set_ylabel('non-support samples')
    ax.set_title('Non-support samples by layer and POS (paper Fig. 6)')
    ax.legend(fontsize=7, ncol=1, loc='upper left', bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


# ----------------------------------------------------------------------------- heads


def fit_head(x, y, keep, vocab: int, lam: float, epochs: int, seed: int = 0):
    """Softmax regression W [V, d] on rows ``keep`` of (x, y): minibatch Adam on the mean
    token loss + λ‖W‖² (an LM head trained with the body fixed)."""
    import jax
    import jax.numpy as jnp
    import optax

    xs, ys = jnp.asarray(x[keep]), jnp.asarray(y[keep])
    w = jnp.zeros((vocab, x.shape[1]), jnp.float32)
    tx = optax.adam(3e-3)
    state = tx.init(w)

    def loss(w, xb, yb):
        logp = jax.nn.log_softmax(xb @ w.T, axis=-1)
        return -jnp.take_along_axis(logp, yb[:, None], 1).mean() + lam * jnp.sum(w * w)

    @jax.jit
    def step(w, s, xb, yb):
        g = jax.grad(loss)(w, xb, yb)
        u, s = tx.update(g, s, w)
        return optax.apply_updates(w, u), s

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        perm = rng.permutation(len(ys))
        for b in range(0, len(perm) - 511, 512):
            i = perm[b : b + 512]
            w, state = step(w, state, xs[i], ys[i])
    return w


def head_stats(w, x, y, tau: float) -> tuple[float, np.ndarray, float]:
    """(mean token loss, support status [n], standard error of the mean loss) of rows
    (x, y) under head W."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def chunk(xb, yb):
        logp = jax.nn.log_softmax(xb @ w.T, axis=-1)
        p = jnp.exp(logp)
        p_y = jnp.take_along_axis(p, yb[:, None], 1)[:, 0]
        others = p.at[jnp.arange(len(yb)), yb].set(0.0)
        support = ((1 - p_y) >= tau) | (others.max(1) >= tau)
        return -jnp.take_along_axis(logp, yb[:, None], 1)[:, 0], support

    losses, support = [], []
    for b in range(0, len(y), 4096):
        lo, su = chunk(jnp.asarray(x[b : b + 4096]), jnp.asarray(y[b : b + 4096]))
        losses.append(np.asarray(lo))
        support.append(np.asarray(su))
    per_token = np.concatenate(losses)
    se = float(per_token.std() / np.sqrt(len(per_token)))
    return float(per_token.mean()), np.concatenate(support), se


def removal_subsets(alpha_max: np.ndarray, support: np.ndarray, seed: int) -> dict[str, Any]:
    """The paper's Table 2 training sets: 'original' (all), 'hard' (support samples
    only), 'soft' (each token kept with probability max_v |α_{i,v}|), 'random' (as many
    tokens as 'hard', uniformly)."""
    rng = np.random.default_rng(seed)
    n = len(support)
    random = np.zeros(n, bool)
    random[rng.choice(n, size=int(support.sum()), replace=False)] = True
    return {
        'original': np.ones(n, bool),
        'hard': support.copy(),
        'soft': rng.random(n) < np.clip(alpha_max, 0.0, 1.0),
        'random': random,
    }


def table2_heads(phi, y, phi_test, y_test, subsets, support, vocab, tau, args):
    """Table 2 (a): only the LM head retrained (body fixed) on each subset."""
    rows = {}
    for name, keep in subsets.items():
        w = fit_head(phi, y, keep, vocab, args.head_l2, args.head_epochs)
        test_loss, _, se = head_stats(w, phi_test, y_test, tau)
        _, new_support, _ = head_stats(w, phi, y, tau)
        rows[name] = {
            'kept_tokens': int(keep.sum()),
            'test_loss': test_loss,
            'test_loss_se': se,
            'support_in_new_set': [int(support[keep].sum()), int(new_support[keep].sum())],
            'support_in_original_set': [int(support.sum()), int(new_support.sum())],
        }
        print(f'[support] table2 heads {name}: {rows[name]}', flush=True)
    return rows


def _digest(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a, np.int64).tobytes()).hexdigest()[:16]


def table2_full(train_examples, test_examples, subsets, row_example, row_pos, tau, args, work):
    """Table 2 (b): the whole model trained from scratch on each subset (loss masks keep
    only the subset's tokens; same init, data order and steps), then its test loss and
    support counts from a token index of the training passages."""
    import jax

    from trackstar_jax import losses, support, train
    from trackstar_jax import sharding as shd
    from trackstar_jax.data import examples as examples_lib
    from trackstar_jax.models import DecoderConfig, DecoderLM

    cfg = DecoderConfig(vocab_size=4096, num_layers=4, d_model=128, num_heads=4,
                        num_kv_heads=1, mlp_dim=512, max_len=128)  # fmt: skip
    model = DecoderLM(cfg)
    mesh = shd.make_mesh()
    tc = train.TrainConfig(
        batch_size=16, seq_len=128, num_steps=args.retrain_steps, warmup_steps=50,
        learning_rate=1e-2, min_dim_size_to_factor=128,
    )  # fmt: skip
    tx = train.make_optimizer(tc)
    token_nll = jax.jit(lambda p, t: -losses.target_log_probs(model.apply({'params': p}, t), t))
    rows = {}
    for name, keep in subsets.items():
        # A finished retraining is kept in the workdir (keyed by what made it): a rerun of
        # the benchmark, or one after a crash, does not retrain it.
        done_path = os.path.join(work, f'table2_full_{name}.json')
        stamp = {'steps': tc.num_steps, 'kept_rows_digest': _digest(np.flatnonzero(keep)),
                 'tau': tau, 'passages': len(train_examples)}  # fmt: skip
        if os.path.exists(done_path):
            with open(done_path) as f:
                done = json.load(f)
            if done.get('stamp') == stamp:
                rows[name] = done['row']
                print(f'[support] table2 full {name}: {rows[name]} (kept from {done_path})')
                continue
        masks = [np.zeros(len(ex['tokens']), np.float32) for ex in train_examples]
        for r in np.flatnonzero(keep):
            masks[row_example[r]][row_pos[r]] = 1.0
        data = [dict(ex, loss_mask=m) for ex, m in zip(train_examples, masks, strict=True)]
        data = [ex for ex in data if ex['loss_mask'].any()]
        state, shardings = train.create_train_state(model, tc, mesh)
        step = train.make_train_step(model, tx, mesh, shardings)
        rng = np.random.default_rng(0)
        for _ in range(tc.num_steps):
            group = [data[i] for i in rng.choice(len(data), tc.batch_size, replace=False)]
            length = examples_lib.bucket_length(max(len(e['tokens']) for e in group), 128)
            state, _ = step(state, examples_lib.pad_batch(group, tc.batch_size, length))
        nll = []
        for b in range(0, len(test_examples), 64):
            batch = examples_lib.pad_batch(test_examples[b : b + 64], 64, 128)
            per = np.asarray(token_nll(state.params, batch['tokens']))
            nll.append(per[batch['loss_mask'] > 0])
        nll = np.concatenate(nll)
        tok = support.TokenIndex(support.featurize_tokens(
            model, state.params, train_examples, os.path.join(work, f'table2_{name}'),
            support.SupportConfig(seq_len=128, batch_size=16)))  # fmt: skip
        new_support = (np.abs(tok.index.extra('alpha')) >= tau).any(axis=1)
        rows[name] = {
            'kept_tokens': int(keep.sum()),
            'test_loss': float(nll.mean()),
            'test_loss_se': float(nll.std() / np.sqrt(len(nll))),
            'support_in_new_set': int(new_support[keep].sum()),
            'support_in_original_set': int(new_support.sum()),
        }
        with open(done_path, 'w') as f:
            json.dump({'stamp': stamp, 'row': rows[name]}, f)
        print(f'[support] table2 full {name}: {rows[name]}', flush=True)
    return rows


def layer_features(model, params, examples, rows_by_example) -> list[np.ndarray]:
    """Every block's output at the position before each target token, RMS-normalised
    (no learned scale), then the final normed hidden: one [n, d] array per layer."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from trackstar_jax.models.decoder import DecoderBlock

    def run(p, tokens):
        outs = []

        def grab(next_fun, args_, kwargs, context):
            out = next_fun(*args_, **kwargs)
            if isinstance(context.module, DecoderBlock) and context.method_name == '__call__':
                outs.append(out)
            return out

        with nn.intercept_methods(grab):
            model.apply({'params': p}, tokens)
        rms = lambda h: h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)  # noqa: E731
        return [rms(h.astype(jnp.float32)) for h in outs]

    run = jax.jit(run)
    per_layer = None
    for ex, positions in zip(examples, rows_by_example, strict=True):
        if not len(positions):
            continue
        hs = run(params, jnp.asarray(np.asarray(ex['tokens'])[None]))
        got = [np.asarray(h[0])[positions - 1] for h in hs]
        per_layer = [[g] for g in got] if per_layer is None else [
            a + [g] for a, g in zip(per_layer, got, strict=True)]  # fmt: skip
    return [np.concatenate(a) for a in per_layer]


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
    # A full run's figures sit beside its committed JSON; a quick or --out run's in the
    # workdir, so a smoke run never touches the committed results.
    fig_dir = args.workdir if (args.quick or args.out) else harness.RESULTS_DIR
    figure1(counts, os.path.join(fig_dir, f'{prefix}_fig1.png'))
    tags = row_tags(idx, examples, tokenizer.decode)
    by_pos = pos_shares(_labels(tok, args.label_tau), tags)
    figure2(by_pos, float(_labels(tok, args.label_tau).mean()), args.label_tau,
            os.path.join(fig_dir, f'{prefix}_fig2.png'))  # fmt: skip

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
    figure5(probes, majority, os.path.join(fig_dir, f'{prefix}_fig5.png'))

    # Table 2: removing non-support samples (α, support status from the last checkpoint).
    tau = args.label_tau
    support_rows = _labels(tok, tau)
    alpha_max = np.abs(idx.extra('alpha')).max(axis=1)
    targets = idx.extra('target')[:, 0]
    phi_all = idx.read(slice(0, len(idx)))
    test_records = corpus_lib.load_corpus(limit=args.passages + args.test_passages)[args.passages :]
    test_examples = examples_lib.corpus_examples(test_records, tokenizer, 128)
    test_idx = support.featurize_tokens(last.model, last.params, test_examples,
                                        os.path.join(work, 'tokens_test'), cfg)  # fmt: skip
    phi_test, y_test = test_idx.read(slice(0, len(test_idx))), test_idx.extra('target')[:, 0]
    subsets = removal_subsets(alpha_max, support_rows, seed=0)
    vocab = int(idx.manifest['vocab_size'])
    heads = table2_heads(phi_all, targets, phi_test, y_test, subsets, support_rows, vocab, tau,
                         args)  # fmt: skip
    number, names = tok.row_examples()
    positions = np.array([support.split_row_id(r)[1] for r in idx.ids])
    full = None
    if args.retrain_steps:
        by_name = {ex['id']: i for i, ex in enumerate(examples)}
        row_example = np.array([by_name[names[k]] for k in number])
        full = table2_full(examples, test_examples, subsets, row_example, positions, tau, args,
                           work)  # fmt: skip

    # Figure 6: a new head per layer; the share of non-support samples at each depth.
    per_example = [positions[number == e] for e in range(len(names))]
    by_name = {ex['id']: ex for ex in examples}
    feats = layer_features(last.model, last.params, [by_name[n] for n in names], per_example)
    layers = []
    for j, x in enumerate(feats, 1):
        w = fit_head(x, targets, np.ones(len(targets), bool), vocab, args.head_l2,
                     args.head_epochs)  # fmt: skip
        loss, sup, _ = head_stats(w, x, targets, tau)
        by_tag = dict(zip(*(a.tolist() for a in np.unique(tags[~sup], return_counts=True)),
                          strict=True))  # fmt: skip
        layers.append({'layer': j, 'train_loss': loss, 'non_support': int((~sup).sum()),
                       'non_support_share': float((~sup).mean()),
                       'non_support_by_pos': by_tag})  # fmt: skip
        print(f'[support] layer {j}: {layers[-1]}', flush=True)
    figure6(layers, os.path.join(fig_dir, f'{prefix}_fig6.png'))
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
        'table2': {
            'tau': tau,
            'soft_rule': 'token i kept with probability max_v |α_{i,v}| (stored α)',
            'heads_only': {
                'rows': heads,
                'head': 'softmax regression on φ of the last checkpoint (body fixed), '
                f'L2 {args.head_l2}, {args.head_epochs} epochs of Adam',
                'test': f'{len(y_test)} target tokens of the next {len(test_records)} '
                'passages (the body was trained on the whole corpus)',
            },
            'full_model': None
            if full is None
            else {
                'rows': full,
                'training': f'from scratch, {args.retrain_steps} steps of 16 passages, '
                'Adafactor lr 1e-2, loss masked to the subset',
            },
        },
        'layers': {
            'tau': tau,
            'features': 'each block output (RMS-normalised, no scale) at the context '
            'position; a new softmax head per layer fitted on all tokens',
            'rows': layers,
        },
        'pos': {
            'tau': args.label_tau,
            'tagger': 'trackstar_jax.data.pos: out-of-context rules (closed-class lists, '
            'WordNet lemmas of the embedded glosses via its suffix rules); not a tagger',
            'by_tag': by_pos,
        },
        'paper': PAPER,
        'figures': [f'{prefix}_fig{i}.png' for i in (1, 2, 5, 6)],
        'wall_seconds': time.time() - t0,
    }


def _pct(x: float) -> str:
    return f'{100 * x:.1f}%'


def readme_table(res: dict[str, Any]) -> str:
    """The README's support-samples section: the paper's numbers beside ours."""
    c5, c9 = res['counts']['0.5'], res['counts']['0.9']
    p = res['probe']
    last, init = p['by_checkpoint'][-1], p['by_checkpoint'][0]

    def acc(entry, key):
        lo, hi = entry[key + '_ci']
        return f'{100 * entry[key]:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]'

    few = lambda c: c['tokens_with_fewer_than_10'] / max(c['tokens_with_support'], 1)  # noqa: E731
    lines = [
        f'From `{res["command"]}` ({res["timestamp"][:10]}): the demo model (4 layers, width '
        f'{res["model"]["d_model"]}) trained from scratch, the {res["passages"]:,} first '
        f'corpus passages ({c9["target_tokens"]:,} target tokens) at its last checkpoint. '
        'Classifier accuracies on a test split of '
        f'{p["split_sizes"][2]} tokens with 95% Wilson intervals; labels: support status at '
        f'τ = {p["label_tau"]} (majority class {_pct(p["majority_test_accuracy"])}).',
        '',
        '| | paper (GPT-2 117M, wikitext-2) | ours |',
        '|---|---|---|',
        f'| support samples, share of training tokens | 54% (τ = 0.9) | '
        f'{_pct(c9["support_share"])} (τ = 0.9), {_pct(c5["support_share"])} (τ = 0.5) |',
        f'| tokens v with < 10 support samples | 58% | {_pct(few(c9))} (τ = 0.9) |',
        f'| Type-1 / Type-2 memberships (τ = 0.9) | — | {c9["type1_memberships"]:,} / '
        f'{c9["type2_memberships"]:,} |',
        f'| support status from θ(0), MLP on projected gradient | ~80% | '
        f'{acc(init, "gradient/mlp")} |',
        f'| support status from the last checkpoint, same | ~85% | {acc(last, "gradient/mlp")} |',
        f'| same, MLP on the last hidden state (θ(0) / last) | ~65% at best | '
        f'{acc(init, "last_hidden/mlp")} / {acc(last, "last_hidden/mlp")} |',
    ]
    paper_heads = {'original': 5.08, 'hard': 5.64, 'soft': 5.13, 'random': 5.18}
    paper_full = {'original': 5.08, 'hard': 6.57, 'soft': 5.69, 'random': 5.47}
    heads = res['table2']['heads_only']['rows']
    full = (res['table2'].get('full_model') or {}).get('rows', {})
    for name in ('original', 'hard', 'soft', 'random'):
        h = heads[name]
        whole = full.get(name)
        whole_loss = '—' if whole is None else f'{whole["test_loss"]:.2f}'
        lines.append(
            f'| test loss, {name} set: heads only / whole model | {paper_heads[name]} / '
            f'{paper_full[name]} | {h["test_loss"]:.2f} / {whole_loss} |'
        )
    if 'pos' in res:
        by = res['pos']['by_tag']

        def share(key):
            e = by.get(key)
            if e is None:
                return '—'
            lo, hi = e['support_share_ci']
            return f'{_pct(e["support_share"])} [{100 * lo:.1f}, {100 * hi:.1f}]'

        lines += [
            f'| support share by POS of the target (τ = {res["pos"]["tau"]}): VERB / PUNCT | '
            f'86% / 20% | {share("VERB")} / {share("PUNCT")} |',
            '| same, semantically rich (ADV NUM ADJ VERB NOUN) / light (PART AUX DET ADP '
            f'PUNCT) tags | rich > light | {share("group:rich")} / {share("group:light")} |',
        ]
    layers = res['layers']['rows']
    lines.append(
        '| non-support share by layer (new head per layer) | rises with depth | '
        + ' → '.join(_pct(r['non_support_share']) for r in layers)
        + ' |'
    )

    def order(rows):
        """Names by test loss; '≈' where neighbours differ by < 2 standard errors."""
        names = sorted(rows, key=lambda n: rows[n]['test_loss'])
        out = names[0]
        for a, b in zip(names, names[1:], strict=False):
            gap = rows[b]['test_loss'] - rows[a]['test_loss']
            se = np.hypot(rows[a].get('test_loss_se', 0.0), rows[b].get('test_loss_se', 0.0))
            out += (' ≈ ' if gap < 2 * se else ' < ') + b
        return out

    margin = last['gradient/mlp_ci'][0] - p['majority_test_accuracy']
    margin0 = init['gradient/mlp_ci'][0] - p['majority_test_accuracy']
    lines += [
        '',
        f'Test-loss order (≈: within 2 standard errors), heads only: {order(heads)} (paper: '
        'original < soft < random < hard)'
        + (
            f'; whole model: {order(full)} (paper: original < random < soft < hard).'
            if full
            else '.'
        ),  # fmt: skip
        f"Where the scale disagrees: {_pct(c9['support_share'])} of the demo model's "
        'training tokens are support samples (paper 54%), '
        f'{_pct(c9["type2_memberships"] / max(c9["type1_memberships"], 1))} as many Type-2 as '
        'Type-1 memberships (the model is rarely confident in a wrong token); a '
        f'classifier must beat the majority class ({_pct(p["majority_test_accuracy"])}), and '
        "the last checkpoint's gradient MLP does so "
        + ('beyond its interval' if margin > 0 else 'only within its interval')
        + ', the one at θ(0) '
        + (
            'also.'
            if margin0 > 0
            else "does not: the paper's ~80% from initialisation is "
            'not shown here beyond the majority rate.'
        ),
    ]
    return '\n'.join(lines) + '\n'


def write_readme(res: dict[str, Any], check: bool = False) -> bool:
    """Puts :func:`readme_table` in the README (with ``check``: only compares)."""
    return harness.readme_section('support_samples', readme_table(res), check=check)


def _arguments(parser) -> None:
    parser.add_argument('--passages', type=int, default=8192)
    parser.add_argument('--probe_tokens', type=int, default=6000)
    parser.add_argument('--probe_block_dim', type=int, default=256)
    parser.add_argument('--label_tau', type=float, default=0.9)
    parser.add_argument('--test_passages', type=int, default=1024)
    parser.add_argument('--head_epochs', type=int, default=6)
    parser.add_argument('--head_l2', type=float, default=1e-6)
    parser.add_argument(
        '--retrain_steps',
        type=int,
        default=600,
        help='steps of each from-scratch retraining (0 skips Table 2 b)',
    )


def _prepare(args, parser) -> None:
    del parser
    if args.quick:
        args.passages, args.probe_tokens = min(args.passages, 1000), min(args.probe_tokens, 1500)
        args.test_passages, args.head_epochs = 200, 2
        args.retrain_steps = min(args.retrain_steps, 40)


def main(argv=None) -> None:
    out = os.path.join(harness.RESULTS_DIR, 'support_samples.json')
    res = harness.study_main(argv, __doc__, out, run, write_readme,
                             workdir='/tmp/support_samples_bench', quick_help='small sets',
                             add_arguments=_arguments, prepare=_prepare)  # fmt: skip
    if res is not None:
        print(json.dumps({k: res[k] for k in ('counts', 'probe')}, indent=1)[:4000])


if __name__ == '__main__':
    main()
