"""HySAC remote code: the files in this folder ship to the Hub beside the weights (torch + transformers only).

Installed as ``hysac_hf.modeling``; ``hysac_hf`` re-exports the classes. Nothing else may live here.
"""
