"""The `valise` command: a thin edge over the library. Each submodule registers one group of commands."""
