"""Test set-up: 8 fake CPU devices so sharded code always runs sharded; no network for TFDS."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("NO_GCE_CHECK", "true")
# Subprocesses too: with libtpu installed (test extra, for test_aot) jax would otherwise probe
# for a TPU at every start-up. test_aot creates its compile-only TPU client explicitly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

# One compilation cache for the whole session (and the subprocesses tests start): identical
# train steps built by different tests compile once.
_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "medssl_jax_xla")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory) -> str:
    """A session-wide TFDS data_dir in which the demo dataset is built once, on first use."""
    return str(tmp_path_factory.mktemp("tfds"))
