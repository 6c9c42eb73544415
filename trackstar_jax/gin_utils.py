"""gin wiring: the typed configs every job takes, parsing, and the written config.

The jobs are keyword-only functions decorated ``gin.configurable`` where they are
defined; this module makes the typed config dataclasses they take (and the ones the
Python API shares) configurable under ``trackstar_jax.``, imports the job modules so
their names are registered, and parses files and bindings, as T5X's ``gin_utils`` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import gin
import jax

from trackstar_jax import compile as compile_lib
from trackstar_jax import grads, pipeline, support, train, train_index
from trackstar_jax.data import mixture as mixture_lib
from trackstar_jax.eval import fact_tracing
from trackstar_jax.jobs import aot, attribution, support_samples, train_lm  # noqa: F401 (jobs)
from trackstar_jax.models import decoder, llama

GIN_CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'gin_configs'
)

DecoderConfig = gin.external_configurable(decoder.DecoderConfig, module='trackstar_jax')
LlamaConfig = gin.external_configurable(llama.LlamaConfig, module='trackstar_jax')
CompileConfig = gin.external_configurable(compile_lib.CompileConfig, module='trackstar_jax')
TrainConfig = gin.external_configurable(train.TrainConfig, module='trackstar_jax')
GradientSpec = gin.external_configurable(grads.GradientSpec, module='trackstar_jax')
IndexConfig = gin.external_configurable(pipeline.IndexConfig, module='trackstar_jax')
FitConfig = gin.external_configurable(pipeline.FitConfig, module='trackstar_jax')
ScoreConfig = gin.external_configurable(pipeline.ScoreConfig, module='trackstar_jax')
Method = gin.external_configurable(pipeline.Method, module='trackstar_jax')
EvalConfig = gin.external_configurable(fact_tracing.EvalConfig, module='trackstar_jax')
FactMixture = gin.external_configurable(mixture_lib.FactMixture, module='trackstar_jax')
TrainIndexConfig = gin.external_configurable(train_index.TrainIndexConfig, module='trackstar_jax')
SupportConfig = gin.external_configurable(support.SupportConfig, module='trackstar_jax')


def parse(gin_files: Sequence[str], gin_bindings: Sequence[str]) -> None:
    """Parses gin files (searched also under ``gin_configs/``) and bindings."""
    gin.add_config_file_search_path(GIN_CONFIG_DIR)
    gin.add_config_file_search_path(os.getcwd())
    gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings), finalize_config=True)


def write_config(directory: str, name: str = 'config.gin', operative: bool = False) -> str | None:
    """Process 0 writes the gin config beside a job's outputs.

    Called when a job starts (``operative=False``: every binding parsed, so a job that
    dies still says how it was configured) and again when it ends (``operative=True``:
    the values the job actually used, defaults included).
    """
    if jax.process_index() != 0:
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    text = gin.operative_config_str() if operative else gin.config_str()
    with open(path + '.tmp', 'w') as f:
        f.write(text)
    os.replace(path + '.tmp', path)
    return path
