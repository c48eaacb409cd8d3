"""Moved to mclfir_dist.utils.distributed (collective helpers that evaluation uses too, one layer down); the
old name stays for plug-ins written against it."""
from ..utils.distributed import *  # noqa: F401,F403
