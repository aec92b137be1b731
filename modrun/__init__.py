"""modrun: a declarative experiment runner for model compression research."""

__version__ = "0.1.0"
