"""Extension modules of the built-in cells' kernels, compiled at install time (see ``symgate._aot``)."""
