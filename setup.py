"""medssl_jax: big self-supervised models (SimCLR, MICLe, SwAV, DINO) for medical imaging in JAX."""

import setuptools

setuptools.setup(
    name="medssl_jax",
    version="0.1.0",
    description="SimCLR, MICLe, SwAV, DINO pretraining and fine-tuning for medical imaging in JAX.",
    packages=setuptools.find_packages(
        include=["medssl_jax", "medssl_jax.*", "data_builders", "data_builders.*"]
    ),
    package_data={"data_builders": ["*/dummy_data/**/*", "*/*.txt", "*/*.tsv"]},
    include_package_data=True,
    python_requires=">=3.11,<3.14",
    install_requires=[
        "jax[cpu]>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorflow-cpu>=2.18,<2.22",
        "tensorflow-datasets>=4.9.7,<4.10",
        "tensorboard>=2.18,<2.22",
        "ml-collections>=1.0,<2",
        "clu>=0.0.12,<0.1",
        "numpy>=1.26,<3",
        "pillow>=10",
        "importlib_resources>=6",  # tensorflow-datasets imports it but does not declare it
        "matplotlib>=3.8",
        # DICOM (data_builders/dicom_folder): RLE natively, baseline JPEG via Pillow, JPEG 2000
        # via pylibjpeg-openjpeg (MIT). JPEG lossless / 12-bit extended would need the GPL
        # pylibjpeg-libjpeg, deliberately not a dependency: such files are named errors.
        "pydicom>=3.0,<4",
        "pylibjpeg>=2,<3",
        "pylibjpeg-openjpeg>=2,<3",
        "safetensors>=0.4",  # medssl_jax.export: framework-neutral weights
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "scikit-learn>=1.4",
            "ruff>=0.6",
            # tests/test_aot.py compiles a tiny model for a TPU topology with no TPU attached.
            # Only Linux x86_64 has libtpu wheels; elsewhere it is not installed and the
            # test skips. The pin is jax 0.10.2's (jax[tpu]).
            'libtpu==0.0.42.*; platform_system == "Linux" and platform_machine == "x86_64"',
        ],
        # medssl_jax.aot: compile-only TPU client (the TPU compiler; no TPU needed).
        "tpu-aot": ["libtpu==0.0.42.*"],
    },
)
