"""Pretraining methods as plug-ins: `get(name)` returns a `base.Method`; `names()` lists them.

Importing this package registers every method module below; the generic step and loop
(`pretrain.py`, `loop.py`) only ever go through the registry.
"""

from medssl_jax.methods import dino, hybrid, simclr, swav  # noqa: F401  (they register)
from medssl_jax.methods.base import Crops, Method, Parts, Views, get, names, register

__all__ = ["Crops", "Method", "Parts", "Views", "get", "names", "register"]
