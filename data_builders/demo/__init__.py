"""`demo` dataset: importing this package registers the TFDS builder `Demo` ('demo')."""

from data_builders.demo.demo import Demo, DemoConfig

__all__ = ["Demo", "DemoConfig"]
