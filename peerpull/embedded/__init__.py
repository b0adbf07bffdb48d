"""Private, embedded instances of the outside parts (registry, containerd) for demos, benchmarks and tests."""
