"""The `hs2p` subcommands: thin edges that read files, call the library and write results."""
