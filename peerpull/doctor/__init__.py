"""`peerpull doctor`: small checks of a node, one module per group, each result one line with its fix."""
