"""The model card template (hysac.md.j2); installed as ``hysac_hf.model_cards`` so wheels can render cards."""
