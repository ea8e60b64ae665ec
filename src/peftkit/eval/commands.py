"""`peftkit eval`, `peftkit generate`, `peftkit chat`: registered with the CLI when the parser is built."""
