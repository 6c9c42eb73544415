"""The support-samples job: a token index of the corpus at a checkpoint, its support
counts, and for each fact query the training tokens that most promote and most deter
the model's first target token after the prompt. Gin-configurable (``launch/support.py``).

Writes under ``workdir``: the token index (``output``), ``<output>.json`` (counts at τ,
per-query contributions) and ``<output>.html`` (promoting and deterring tokens side by
side, each in its passage's context).
"""

from __future__ import annotations

import html
import json
from typing import Any

import gin
import jax

from trackstar_jax import index as index_lib
from trackstar_jax import sharding as shd
from trackstar_jax import support
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.data import examples as examples_lib
from trackstar_jax.eval import report
from trackstar_jax.jobs.attribution import DEFAULT_MESH, MeshAxes, resolve
from trackstar_jax.jobs.common import checkpoint_tokenizer, load_model


@gin.configurable
def support_samples(
    *,
    workdir: str,
    checkpoint_dir: str = 'checkpoints',
    step: int | None = None,
    corpus_path: str = corpus_lib.CORPUS_PATH,
    tokenizer_path: str = corpus_lib.TOKENIZER_PATH,
    max_examples: int | None = None,
    facts_path: str = corpus_lib.FACTS_PATH,
    max_queries: int = 20,
    config: support.SupportConfig = support.SupportConfig(),
    tau: float = 0.5,
    k: int = 10,
    mesh_axes: MeshAxes = DEFAULT_MESH,
    output: str = 'support_index',
) -> str:
    """Builds the token index (resumable) and writes the counts and contributions.

    Args:
      workdir: where outputs go (relative names are under it).
      checkpoint_dir: a ``train_lm`` (or imported) checkpoint directory.
      step: its step (None: the latest).
      corpus_path: JSONL(.gz) of {"id", "text"} passages (every token a target).
      tokenizer_path: SentencePiece model (unless the checkpoint carries a tokenizer).
      max_examples: at most this many passages.
      facts_path: fact queries {"id", "prompt", "target"}.
      max_queries: at most this many queries.
      config: how the token index is built (seq_len, α floor, projection).
      tau: the support threshold τ of the counts and the per-query support sets.
      k: promoting / deterring tokens shown per query.
      mesh_axes: the mesh.
      output: the token index's name; the JSON and HTML take it as their stem.

    Returns:
      The URL of the JSON summary.
    """
    mesh = shd.make_mesh(mesh_axes)
    loaded = load_model(resolve(workdir, checkpoint_dir), mesh, step)
    tokenizer = checkpoint_tokenizer(loaded, tokenizer_path)
    records = corpus_lib.load_corpus(corpus_path, limit=max_examples)
    examples = examples_lib.corpus_source(records, tokenizer, config.seq_len)
    url = resolve(workdir, output)
    extra = {'checkpoint_dir': loaded.checkpoint_dir, 'checkpoint_step': loaded.step}
    # Token rows are independent: in a multi-process job each process builds its chunks
    # on its own devices from a host copy of the parameters.
    multi = jax.process_count() > 1
    params = support.host_params(loaded.params) if multi else loaded.params
    idx = support.featurize_tokens(
        loaded.model, params, examples, url, config, mesh=None if multi else mesh,
        manifest_extra=extra,
    )  # fmt: skip
    if jax.process_index() != 0:
        return url.rstrip('/') + '.json'
    tok = support.TokenIndex(idx)
    counts = support.summary(tok, tau)
    w, _ = support.head_of(loaded.model, params)
    proj = support.projection_matrix(w.shape[1], config)
    facts = corpus_lib.load_facts(facts_path)[:max_queries]
    prompts = [[tokenizer.eos_id, *tokenizer.encode(f['prompt'])] for f in facts]
    phis = support.prompt_features(loaded.model, params, prompts, proj)
    number = {e: i for i, e in enumerate(examples.ids)}

    def example_of(ex_id):
        return examples.rows(number[ex_id], number[ex_id] + 1)[0]

    queries = []
    for f, phi in zip(facts, phis, strict=True):
        v = tokenizer.encode(f['target'])[0]
        c = tok.contributions(v, phi, k)
        s = tok.support(v, max(tau, float(idx.manifest['alpha_floor'])))
        queries.append(
            {
                'id': f['id'],
                'prompt': f['prompt'],
                'target': f['target'],
                'token': int(v),
                'token_text': tokenizer.decode([v]),
                'support_type1': len(s.type1_ids),
                'support_type2': len(s.type2_ids),
                'total': c.total,
                'dropped_bound': c.dropped_bound,
                **support.describe(c, example_of, tokenizer.decode),
            }
        )
    out = {
        'index': url,
        'checkpoint': extra,
        'config': {**vars(config), 'tau': tau, 'k': k},
        'counts': {k_: v for k_, v in counts.items() if k_ != 'support_set_sizes'},
        'queries': queries,
    }
    json_url = url.rstrip('/') + '.json'
    index_lib.write_text(json_url, json.dumps(out, indent=1))
    texts = {r['id']: r['text'] for r in records}
    index_lib.write_text(url.rstrip('/') + '.html', html_page(out, texts))
    return json_url


def html_page(out: dict[str, Any], texts: dict[str, str]) -> str:
    """Support counts and, per query, promoting and deterring tokens side by side."""
    e = html.escape
    c = out['counts']
    parts = [
        '<!doctype html><meta charset="utf-8"><title>trackstar_jax support samples</title>',
        '<style>body{font-family:sans-serif;max-width:1200px;margin:auto}'
        'td{vertical-align:top;padding:2px 6px;font-size:90%}'
        '.ent{background:#e8f5e9}.opp{background:#ffebee}</style>',
        '<h1>Support samples of next-word prediction</h1>',
        f'<p>{c["target_tokens"]:,} training target tokens; at τ = {c["tau"]}: '
        f'{c["support_samples"]:,} support samples ({100 * c["support_share"]:.1f}%), '
        f'{c["type1_memberships"]:,} Type-1 and {c["type2_memberships"]:,} Type-2 memberships; '
        f'{c["tokens_with_support"]:,} of {c["target_vocabulary"]:,} target tokens have a '
        f'support set, {c["tokens_with_fewer_than_10"]:,} of them fewer than 10 samples.</p>',
        '<p>Score = α<sub>i,v</sub>⟨φ(x<sub>i</sub>), φ(prompt)⟩: its share of the logit of v '
        'after the prompt under the representer decomposition (up to 1/2Nλ). Promoting: '
        'largest; deterring: most negative. Exact over the index; tokens the index dropped '
        '(p(v | x) below the floor) each score below the stated bound.</p>',
    ]
    for q in out['queries']:
        parts.append(
            f'<h3>{e(q["prompt"])}<u>{e(q["target"])}</u> <small>(v = {q["token"]} '
            f'"{e(q["token_text"])}": {q["support_type1"]} Type-1, {q["support_type2"]} '
            f'Type-2 support samples; dropped tokens |score| &lt; {q["dropped_bound"]:.3g})'
            '</small></h3>' + report.support_table_html(q, texts)
        )
    return '\n'.join(parts)
