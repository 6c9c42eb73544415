"""A cost model for attribution jobs at pod scale, from compiled programs.

Inputs are the per-chip figures of one compiled step (:func:`compile.compile_job`:
FLOPs and bytes per chip per step, examples or rows per step) and each chip's published
peak (:data:`compile.CHIPS`). At a stated model-FLOP utilisation (MFU) a step takes

    t_step = max(FLOPs per chip / (peak FLOP/s · MFU),  HBM bytes per chip / HBM B/s)

and a job of S steps on C chips costs S · t_step · C chip-seconds. Jobs that stream
the index (fit, score) are also bounded by how fast the hosts read it: every one of
the slice's hosts reads its share at ``host_read_bytes_per_s``.

All inputs that are assumptions (MFU, host read bandwidth, chips per host) are
arguments with the value used stated in every result.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trackstar_jax import compile as compile_lib


@dataclasses.dataclass(frozen=True)
class Workload:
    """The attribution job to price (defaults: the paper's 8B setting, §A.2).

    Attributes:
      corpus_tokens: tokens indexed (the paper's pretraining set: 160B).
      seq_len: tokens per example.
      num_queries: queries scored (the paper's T-REx set: 5,400).
      index_dtype_bytes: bytes per stored value (bf16: 2).
      mfu: model-FLOP utilisation assumed for compute-bound steps.
      host_read_bytes_per_s: index read bandwidth of one host (object storage).
      chips_per_host: chips attached to one host.
    """

    corpus_tokens: float = 160e9
    seq_len: int = 2048
    num_queries: int = 5400
    index_dtype_bytes: int = 2
    mfu: float = 0.4
    host_read_bytes_per_s: float = 1.0e9
    chips_per_host: int = 4


def step_seconds(result: dict[str, Any], mfu: float) -> tuple[float, str]:
    """(seconds per step, what bounds it) of a compiled step on its chip."""
    chip = compile_lib.peak(result['device_kind'])
    if chip is None:
        raise ValueError(f'No published peak for {result["device_kind"]!r}; add it to CHIPS.')
    flops_s, _, hbm_s = chip
    compute = result['flops'] / (flops_s * mfu)
    memory = result['bytes_accessed'] / hbm_s
    return (compute, 'compute') if compute >= memory else (memory, 'HBM bandwidth')


def index_cost(result: dict[str, Any], work: Workload) -> dict[str, Any]:
    """Chip-hours and wall hours to index the corpus, and the index size."""
    examples = work.corpus_tokens / work.seq_len
    steps = examples / result['examples_per_step']
    t, bound = step_seconds(result, work.mfu)
    chips = result['num_chips']
    flops_per_token = result['flops'] * chips / result['tokens_per_step']
    index_bytes = examples * result['dim'] * work.index_dtype_bytes
    return {
        'examples': examples,
        'steps': steps,
        'step_seconds': t,
        'bound': bound,
        'chip_hours': steps * t * chips / 3600,
        'wall_hours': steps * t / 3600,
        'tokens_per_s_per_chip': result['tokens_per_step'] / (t * chips),
        'flops_per_token': flops_per_token,
        'index_bytes': index_bytes,
    }


def streaming_cost(result: dict[str, Any], work: Workload, passes: int = 1) -> dict[str, Any]:
    """A job that streams the whole index ``passes`` times (fit: 2, train + queries ≈ 1)."""
    examples = work.corpus_tokens / work.seq_len
    steps = passes * examples / result['rows_per_step']
    t, bound = step_seconds(result, work.mfu)
    chips = result['num_chips']
    hosts = max(1, chips // work.chips_per_host)
    read = passes * examples * result['dim'] * work.index_dtype_bytes
    read_s = read / (hosts * work.host_read_bytes_per_s)
    compute_s = steps * t
    wall = max(read_s, compute_s)
    return {
        'steps': steps,
        'step_seconds': t,
        'compute_hours': compute_s / 3600,
        'read_hours': read_s / 3600,
        'bound': 'index read' if read_s >= compute_s else bound,
        'wall_hours': wall / 3600,
        'chip_hours': wall * chips / 3600,
        'hosts': hosts,
    }


def price(results: list[dict[str, Any]], work: Workload) -> dict[str, Any]:
    """Index, fit and score costs of one model x topology from its compiled steps."""
    by_job = {r['job']: r for r in results}
    out: dict[str, Any] = {'workload': dataclasses.asdict(work)}
    if 'index' in by_job:
        out['index'] = index_cost(by_job['index'], work)
        if 'train' in by_job:
            # Same batch: the kernel's FLOPs relative to a training step's.
            out['index']['flops_vs_train_step'] = (
                by_job['index']['flops'] / by_job['train']['flops']
            )
    if 'fit' in by_job:
        out['fit'] = streaming_cost(by_job['fit'], work, passes=1)
    if 'score' in by_job:
        r = by_job['score']
        passes = -(-work.num_queries // r['queries'])  # query batches, each a full read
        out['score'] = streaming_cost(r, work, passes=passes)
    return out
