"""Released self-supervised ImageNet checkpoints (SimCLR TF1/TF2, SwAV, DINO) -> Orbax
checkpoints of this project's models; `python -m medssl_jax.convert --help`."""
