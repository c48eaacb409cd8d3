"""Moved to mclfir_dist.methods.optim (the optimizer and lr schedules the methods train with, one layer down);
the old name stays for plug-ins written against it."""
from ..methods.optim import *  # noqa: F401,F403
from ..methods.optim import SCHEDULES, build_optimizer, build_scheduler, kernel_options  # noqa: F401
