"""mclfir_dist: distributed continual attribute-specific fashion image retrieval (MCL-FIR)."""
__version__ = "0.1.0"
