"""`peftkit tune`: registered with the CLI when the parser is built."""
