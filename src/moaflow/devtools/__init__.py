"""For developers and the demo, never for a real run: the faithful stand-in datasets (`standin`), the
loopback HTTP server that serves them (`serve`), the demo (`demo`) and the benchmarks (`bench`)."""
