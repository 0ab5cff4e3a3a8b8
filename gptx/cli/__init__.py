"""Command lines of the entry points in launch/ and tools/, one module each: parse, build the config, run.

A command imports what it runs inside its main(), after it has named the accelerator for
DeepSpeed (whose import probes for one) and so that --help and argument errors come back
without importing torch."""
