"""HySAC evaluation: retrieval (Tables 1, 2, 8), classification (Tables 5, 6), histograms, zero-shot; `hysac-eval`."""
