"""Studies: many `mclfir train` runs, kept and resumed by name, and the statistics that compare them. Sits
at the top of the package, beside bench and cli: it runs training as a command, never imports it."""
