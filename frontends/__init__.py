"""Frontends: turn a checkpoint or module into a ModelBundle and trace it to a GraphModule."""
from frontends.generic import ModelBundle, load_model, trace

__all__ = ["ModelBundle", "load_model", "trace"]
