"""mclfir_dist: distributed continual attribute-specific fashion image retrieval (MCL-FIR).

The Python API (docs/api.md): `from mclfir_dist import Retriever, Hit`. It is imported on first use, so
`import mclfir_dist` (and the `mclfir` command) stay quick."""
from .version import __version__
__all__ = ["Hit", "Retriever", "__version__"]


def __getattr__(name: str):
    if name in ("Hit", "Retriever"):
        from .retrieval import api
        return getattr(api, name)
    raise AttributeError(f"module 'mclfir_dist' has no attribute {name!r}")
