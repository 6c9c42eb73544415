"""gin wiring: the configurables every job exposes, parsing, and the operative config.

Jobs are plain keyword-only functions; this module is the only place that makes them
(and the typed config dataclasses) gin-configurable, as T5X's ``gin_utils`` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import gin
import jax

from trackstar_jax import train
from trackstar_jax.eval import fact_tracing  # noqa: F401 (registers the jobs)
from trackstar_jax.jobs import attribution, train_lm  # noqa: F401
from trackstar_jax.models import decoder

GIN_CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'gin_configs'
)

DecoderConfig = gin.external_configurable(decoder.DecoderConfig, module='trackstar_jax')
TrainConfig = gin.external_configurable(train.TrainConfig, module='trackstar_jax')


def parse(gin_files: Sequence[str], gin_bindings: Sequence[str]) -> None:
    """Parses gin files (searched also under ``gin_configs/``) and bindings."""
    gin.add_config_file_search_path(GIN_CONFIG_DIR)
    gin.add_config_file_search_path(os.getcwd())
    gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings), finalize_config=True)


def write_operative_config(directory: str, name: str = 'config.gin') -> str | None:
    """Process 0 writes the resolved gin config beside a job's outputs."""
    if jax.process_index() != 0:
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, 'w') as f:
        f.write(gin.operative_config_str())
    return path
