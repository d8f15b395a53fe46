"""moe.cli: the `moe` command."""
