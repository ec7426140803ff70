"""Configuration of a lag_ds model exported for Hugging Face ``transformers`` (remote code).

Written next to ``config.json`` by ``tools/export_hf.py`` and loaded with
``trust_remote_code=True``. Why a subclass of ``LlamaConfig``: a lag_ds model (megatron-core
GPTModel as built by ``lag_ds.model.build``) is Llama's block -- pre-norm RMSNorm, bias-free
linear layers, gated MLP ``down(act(gate(x)) * up(x))`` -- except for two settings Llama has
a field for (``hidden_act="gelu"``: GeGLU; ``rms_norm_eps=1e-5``: megatron's default) and one
it has not: **learned absolute position embeddings** instead of rotary ones, which
``position_embedding_type`` records (``modeling_lagds.py`` implements it).
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class LagDSConfig(LlamaConfig):
    model_type = "lagds"

    position_embedding_type: str = "learned_absolute"
    """``learned_absolute``: a ``max_position_embeddings x hidden_size`` table added to the token
    embeddings; rotary embedding is not applied. The only value lag_ds models use."""

    def validate_architecture(self):
        super().validate_architecture()
        if self.position_embedding_type != "learned_absolute":
            raise ValueError(f"position_embedding_type must be 'learned_absolute', "
                             f"got {self.position_embedding_type!r}")


__all__ = ["LagDSConfig"]
