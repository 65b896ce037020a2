"""The terminal dashboard (Textual) and the `modeldeck` command. Importing this package imports nothing heavy."""
