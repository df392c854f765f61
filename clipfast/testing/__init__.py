"""Testing helpers that ship with clipfast: ``hf_parity`` runs Hugging Face transformers' own model tests
with clipfast switched on and lists what clipfast changes."""
