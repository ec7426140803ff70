"""Model presets: ``tiny`` (CI), ``small`` (CPU demo), ``ul2-1.1b`` (the LAG paper's UL2 run).

Every preset can be instantiated at another depth (``preset.with_layers(16)``): growing needs the
same architecture with more layers.

The paper (appendix A.2) gives 12 layers, d_model 2048, FFN 5120, 32 heads, seq 1280, "1.1B".
What it does not give, and what we chose so the count comes to ~1.1B:

* FFN is **gated** (GeGLU, as in T5.1.1/UL2): three 2048x5120 matrices per layer, 31.5M;
  attention 4 x 2048^2 = 16.8M; so 48.2M per layer, 579M for 12 layers.
* vocabulary **256,000** (the PaLM/UL2-family SentencePiece size) with **tied** input/output
  embeddings: 524M.
* RMSNorm, no linear biases, learned absolute positions (1280 x 2048 = 2.6M). Rotary
  positions are available on GPU (``position_embedding: rope``) but megatron-core 0.16's
  ``RotaryEmbedding`` moves its table to CUDA unconditionally, so it cannot be the CPU default.
Total: 1.106B parameters at 12 layers (``python -m lag_ds.model.presets ul2-1.1b`` prints it),
1.299B at 16 layers.

``tiny`` and ``small`` take their vocabulary from the tokenizer trained on the corpus.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    num_layers: int
    """Transformer layers (the depth that growth changes)."""
    hidden_size: int
    ffn_hidden_size: int
    """Width of the FFN's hidden layer (per gate branch when ``gated``)."""
    num_attention_heads: int
    seq_length: int
    vocab_size: int | None = None
    """None: taken from the tokenizer (padded to ``vocab_multiple`` x TP)."""
    vocab_multiple: int = 128
    gated: bool = True
    """GeGLU FFN (T5.1.1 / UL2)."""
    tie_embeddings: bool = True
    normalization: str = "RMSNorm"
    position_embedding: str = "learned_absolute"
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"model.normalization must be RMSNorm or LayerNorm, got {self.normalization!r}")
        if self.position_embedding not in ("rope", "learned_absolute"):
            raise ValueError(f"model.position_embedding must be rope or learned_absolute, got {self.position_embedding!r}")

    def with_layers(self, num_layers: int) -> "ModelConfig":
        return dataclasses.replace(self, num_layers=num_layers)

    def padded_vocab_size(self, tokenizer_vocab: int | None, tp_size: int = 1) -> int:
        """Vocabulary padded to a multiple of ``vocab_multiple``, *independent of TP*.

        Megatron pads to ``multiple x TP``; we don't, so that the same checkpoint has the same
        embedding shape at every TP degree and can be resharded (TP must divide the padded size).
        """
        vocab = self.vocab_size if self.vocab_size is not None else tokenizer_vocab
        if vocab is None:
            raise ValueError("model.vocab_size is unset and no tokenizer vocabulary was given")
        padded = -(-vocab // self.vocab_multiple) * self.vocab_multiple
        if padded % tp_size:
            raise ValueError(f"padded vocabulary {padded} is not divisible by tensor_parallel={tp_size}")
        return padded

    def num_parameters(self, vocab_size: int) -> int:
        """Exact parameter count of the megatron-core GPTModel this config builds."""
        h, f = self.hidden_size, self.ffn_hidden_size
        norm = h if self.normalization == "RMSNorm" else 2 * h
        attn = h * 3 * h + h * h
        mlp = h * f * (2 if self.gated else 1) + f * h
        per_layer = attn + mlp + 2 * norm
        embed = vocab_size * h * (1 if self.tie_embeddings else 2)
        pos = 0 if self.position_embedding == "rope" else self.seq_length * h
        return self.num_layers * per_layer + embed + pos + norm


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, seq_length=32),
    "small": ModelConfig(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4, seq_length=128),
    "ul2-1.1b": ModelConfig(
        num_layers=12, hidden_size=2048, ffn_hidden_size=5120, num_attention_heads=32,
        seq_length=1280, vocab_size=256_000,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


if __name__ == "__main__":  # python -m lag_ds.model.presets ul2-1.1b [num_layers]
    cfg = get_preset(sys.argv[1] if len(sys.argv) > 1 else "ul2-1.1b")
    if len(sys.argv) > 2:
        cfg = cfg.with_layers(int(sys.argv[2]))
    vocab = cfg.padded_vocab_size(cfg.vocab_size or 32_000)
    print(f"{cfg.num_layers} layers, vocab {vocab}: {cfg.num_parameters(vocab):,} parameters")
