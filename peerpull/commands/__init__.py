"""One module per `peerpull` subcommand: its parser and its handler."""
