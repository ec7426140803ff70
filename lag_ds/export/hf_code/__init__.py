"""Remote-code files copied verbatim into every Hugging Face export (they import no lag_ds)."""
