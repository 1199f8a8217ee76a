"""The `lungkit` command-line interface (Typer). Library modules never import typer."""
