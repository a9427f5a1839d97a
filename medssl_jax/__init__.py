"""medssl_jax: SimCLR / MICLe self-supervised pretraining and fine-tuning for medical images."""

__version__ = "0.1.0"
