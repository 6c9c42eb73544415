"""The shared absl main of every launch/ script: flags, gin, distributed start-up.

Flags live here, in ``launch/``, and are read only in :func:`run`'s main; the library
never defines or reads a flag.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
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


class _QuietLibraries(logging.Filter):
    """Drops what other libraries log that is not news to a user of these jobs: gin's
    error-level "Path not found" for each search-path prefix it tries before the one
    that holds the file, and Orbax's info-level dump of every save and restore."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == 'Path not found: %s' and 'gin' in record.pathname:
            return False
        return not (
            record.levelno < logging.WARNING and f'{os.sep}orbax{os.sep}' in record.pathname
        )


def help_text(job: Callable[..., Any], default_gin: str, config_name: str) -> str:
    """The launcher's --help: what it does, its flags, and the job's gin settings."""
    import gin

    main = sys.modules.get('__main__')
    lines = [(main.__doc__ or '').strip(), '', f'Default gin file: {default_gin}', '', 'Flags:']
    by_module = flags.FLAGS.flags_by_module_dict()
    mine = [__name__, 'launch_common', sys.argv[0], '__main__']
    seen = set()
    for module in mine:
        for flag in by_module.get(module, []):
            if flag.name not in seen:
                seen.add(flag.name)
                help_line = ' '.join(str(flag.help).split())
                lines.append(f'  --{flag.name}: {help_line} (default: {flag.default!r})')
    registry = getattr(gin.config, '_INVERSE_REGISTRY', {})  # gin has no public lookup
    target = inspect.unwrap(job, stop=lambda f: f in registry)
    info = registry.get(target)
    name = info.name if info is not None else job.__name__
    target = inspect.unwrap(target)
    lines += [
        '',
        f'Gin settings of {name} (--gin_bindings="{name}.PARAM = VALUE"; Python defaults '
        f'shown, the gin file may bind others: see --workdir/{config_name} after a run):',
    ]
    for param in inspect.signature(target).parameters.values():
        if param.name == 'workdir':
            continue
        default = param.default
        shown = 'REQUIRED' if default is gin.REQUIRED else repr(default)
        lines.append(f'  {param.name} = {shown}')
        if dataclasses.is_dataclass(default):
            cls = type(default).__name__
            for field in dataclasses.fields(default):
                lines.append(
                    f'      trackstar_jax.{cls}.{field.name} = {getattr(default, field.name)!r}'
                )
    lines += ['', 'All flags: --helpfull.']
    return '\n'.join(lines)


def run(
    job: Callable[..., Any],
    default_gin: str,
    config_name: str,
    configurable: Callable[..., Any] | None = None,
) -> None:
    """Runs ``job(workdir=...)`` under absl with gin configured from the flags.

    ``--help`` prints the launcher's doc, its flags and the gin settings of
    ``configurable`` (default: ``job``), without starting JAX.

    Process 0 writes the parsed gin config to ``workdir/<config_name>`` before the job
    starts, and the operative one (what the job used) when it ends.
    """

    if any(a in ('--help', '-h', '-?', '--helpshort') for a in sys.argv[1:]):
        print(help_text(configurable or job, default_gin, config_name))
        sys.exit(0)

    def main(argv):
        del argv
        quiet = _QuietLibraries()
        # gin logs through the root logger, Orbax through absl's: filter both.
        for logger in (logging.getLogger(), logging.getLogger('absl')):
            logger.addFilter(quiet)
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
        elif isinstance(result, dict) and isinstance(result.get('outputs'), dict):
            main_outputs = [v for v in result['outputs'].values() if isinstance(v, str)]
            print('Outputs: ' + ', '.join(main_outputs))

    app.run(main, argv=sys.argv)
