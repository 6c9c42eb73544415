"""The compile job: will this job fit on that pod, and what does a step cost?

Gin-configured like the other jobs (the same model and GradientSpec bindings), it
AOT-compiles each requested job's step for ``CompileConfig.topology`` from abstract
params (:mod:`trackstar_jax.compile`) and writes what it found as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import gin
import jax

from trackstar_jax import compile as compile_lib
from trackstar_jax import train
from trackstar_jax.grads import GradientSpec
from trackstar_jax.index import write_text
from trackstar_jax.models import DecoderConfig, DecoderLM, LlamaConfig, LlamaLM


def build_model(model_config: DecoderConfig | LlamaConfig) -> Any:
    """The linen module of a model config (DecoderLM or LlamaLM)."""
    if isinstance(model_config, LlamaConfig):
        return LlamaLM(model_config)
    if isinstance(model_config, DecoderConfig):
        return DecoderLM(model_config)
    raise TypeError(f'Unknown model config {type(model_config).__name__}.')


@gin.configurable(denylist=['workdir'])
def compile_jobs(
    *,
    workdir: str,
    model_config: DecoderConfig | LlamaConfig = gin.REQUIRED,
    spec: GradientSpec = gin.REQUIRED,
    train_config: train.TrainConfig = train.TrainConfig(),
    config: compile_lib.CompileConfig = compile_lib.CompileConfig(),
    jobs: Sequence[str] = ('index',),
    topology: str | None = None,
    output: str | None = None,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """AOT-compiles ``jobs`` and reports per-chip memory, FLOPs and whether each fits.

    Args:
      workdir: where the result JSON goes unless ``output`` is given.
      model_config: the model (DecoderConfig or LlamaConfig).
      spec: the gradient spec of the index (blocks, correction, output fn).
      train_config: the optimizer (its state shapes give the correction's shapes).
      config: topology, mesh, batch and chunk sizes.
      jobs: which of ``compile.JOBS``.
      topology: overrides ``config.topology`` ('local' = the local devices).
      output: the JSON path (default ``workdir/compile.json``).
      command: the command line, recorded in the JSON.

    Returns:
      One result dict per job.

    Raises:
      compile.DoesNotFitError: if a job's step does not fit on a chip (the JSON is
        written first, and the message says by how much and what to change).
    """
    if topology is not None:
        config = dataclasses.replace(config, topology=None if topology == 'local' else topology)
    model = build_model(model_config)
    results = [compile_lib.compile_job(j, model, spec, train_config, config) for j in jobs]
    path = output or os.path.join(workdir, 'compile.json')
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        record = {
            'command': command,
            'model': dataclasses.asdict(model_config),
            'model_type': type(model_config).__name__,
            'spec': spec.to_dict(),
            'config': json.loads(json.dumps(dataclasses.asdict(config), default=list)),
            'results': results,
        }
        write_text(path, json.dumps(record, indent=1))
    print(compile_lib.summary(results))
    bad = [r for r in results if r['fits'] is False]
    if bad:
        raise compile_lib.DoesNotFitError(' | '.join(compile_lib.advice(r) for r in bad))
    return results
