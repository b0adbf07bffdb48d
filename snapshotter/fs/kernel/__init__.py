"""peerpull's own FUSE session: the kernel protocol spoken on /dev/fuse, without libfuse."""
