"""The shared absl main of every launch/ script: flags, gin, distributed start-up.

Flags live here, in ``launch/``, and are read only in :func:`run`'s main; the library
never defines or reads a flag.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_GIN_FILES = flags.DEFINE_multi_string(
    'gin_file', None, 'gin files (searched also under gin_configs/).'
)
_GIN_BINDINGS = flags.DEFINE_multi_string('gin_bindings', [], 'gin bindings.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Job directory: every output goes here.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator', None, 'host:port of process 0 for jax.distributed (pods).'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'jax.distributed processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (jax.distributed).')
_JAX_CACHE = flags.DEFINE_string(
    'jax_cache_dir',
    None,
    'Persistent XLA compilation cache (default <workdir>/.jax_cache; "" disables): '
    're-runs skip compilation.',
)


def run(job: Callable[..., Any], default_gin: str, config_name: str) -> None:
    """Runs ``job(workdir=...)`` under absl with gin configured from the flags.

    Process 0 writes the parsed gin config to ``workdir/<config_name>`` before the job
    starts, and the operative one (what the job used) when it ends.
    """

    def main(argv):
        del argv
        import jax

        from trackstar_jax import gin_utils

        cache = _JAX_CACHE.value
        if cache is None:
            cache = os.path.join(_WORKDIR.value, '.jax_cache')
        if cache:
            jax.config.update('jax_compilation_cache_dir', os.path.abspath(cache))
        if _COORDINATOR.value or os.environ.get('TRACKSTAR_AUTO_DISTRIBUTED'):
            jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        gin_utils.parse(_GIN_FILES.value or [default_gin], _GIN_BINDINGS.value)
        os.makedirs(_WORKDIR.value, exist_ok=True)
        gin_utils.write_config(_WORKDIR.value, config_name)
        result = job(workdir=_WORKDIR.value)
        gin_utils.write_config(_WORKDIR.value, config_name, operative=True)
        if isinstance(result, str):  # a job that wrote one thing says where
            print(result)

    app.run(main, argv=sys.argv)
