"""Datasets for HySAC training and evaluation: ViSU, generic quadruplet datasets and the bundled mini-ViSU."""
