"""Data stage: sources, cleaning, packed cache, knowledge domains and splits."""
