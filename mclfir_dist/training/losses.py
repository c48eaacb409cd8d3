"""Moved to mclfir_dist.methods.losses (the methods' own losses, one layer down); the old name stays for
plug-ins written against it."""
from ..methods.losses import *  # noqa: F401,F403
from ..methods.losses import DISTILLATIONS, DoubletInfoNCE  # noqa: F401  (named: * skips nothing public, but says what)
