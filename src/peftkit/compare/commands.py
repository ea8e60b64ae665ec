"""`peftkit compare`: registered with the CLI when the parser is built."""
