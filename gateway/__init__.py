"""prefixgate's HTTP edge: settings, CLI, app factory, proxy routes, upstream client, errors, metrics."""

__all__ = ["__version__"]

__version__ = "0.1.0"
