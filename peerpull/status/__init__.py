"""`peerpull status`: the daemon's side (which images are how local) and the command's (fetch, render)."""
