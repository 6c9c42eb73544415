r"""Will it fit? AOT-compile a job's step for a TPU topology (or the local devices).

    python launch/compile.py --gin_file=scale/paper_8b_v5p128.gin --job=index \
        --output=benchmarks/results/compile/paper_8b_v5p128_index.json

Builds the job's program from abstract params (no weights, no data) on a mesh of the
topology's devices, compiles it, and prints per-chip memory against the chip's HBM,
FLOPs and bytes per step. Exits non-zero, saying by how much and what to change, when
the step does not fit. TPU topologies compile on any machine with the TPU compiler
installed (pip install "jax[tpu]"); --topology=local compiles for this machine.
"""

import sys

import launch_common
from absl import flags

from trackstar_jax import compile as compile_lib
from trackstar_jax.jobs import aot

_JOB = flags.DEFINE_list('job', ['index'], f'Jobs to compile, of {compile_lib.JOBS}.')
_TOPOLOGY = flags.DEFINE_string(
    'topology', None, "TPU topology (e.g. 'v5p:4x4x8'), 'local', or unset: the gin value."
)
_OUTPUT = flags.DEFINE_string('output', None, 'Result JSON (default <workdir>/compile.json).')


def compile_and_report(*, workdir: str):
    """Runs the compile job with the flags' job list, topology and output."""
    try:
        return aot.compile_jobs(
            workdir=workdir,
            jobs=_JOB.value,
            topology=_TOPOLOGY.value,
            output=_OUTPUT.value,
            command='python ' + ' '.join(sys.argv),
        )
    except compile_lib.DoesNotFitError as e:
        print(f'DOES NOT FIT: {e}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    launch_common.run(compile_and_report, 'scale/paper_8b_v5p128.gin', 'compile.gin')
