"""A cluster cold start simulated in one process on a virtual clock, driven by the real peer code
(bench/simulate; what it models and what it does not: docs/peers.md, "Simulation")."""
