"""Tests run on 8 fake CPU devices; the flag must be set before jax is imported."""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_threefry_partitionable', True)


@pytest.fixture(scope='session', autouse=True)
def _eight_devices():
    # A multi-device test must never skip silently: fail loudly instead.
    assert jax.device_count() == 8, f'expected 8 fake CPU devices, got {jax.devices()}'
