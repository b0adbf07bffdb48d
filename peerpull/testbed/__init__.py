"""The private bench set-up `run`, `quickstart` and `clean` use: an embedded registry, containerd and
daemon under temp dirs, never the host's."""
