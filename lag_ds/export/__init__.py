"""Exports of lag_ds checkpoints to other ecosystems (``hf``: Hugging Face ``transformers``)."""
