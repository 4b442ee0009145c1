"""`ModelConfig`: the shape of a Llama-style decoder, with named presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int = 2
    ffn_dim: int = 512
    vocab_size: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    tie_embeddings: bool = False

    def __post_init__(self):
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if (self.dim // max(self.n_heads, 1)) % 2:
            problems.append(f"head_dim {self.dim // self.n_heads} must be even for rotary embeddings")
        for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            if getattr(self, f) <= 0:
                problems.append(f"{f} must be positive, got {getattr(self, f)}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems) + " (fix the model.* values)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count of the whole model (tied weights counted once)."""
        hd = self.head_dim
        attn = self.dim * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + self.dim + (emb if embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N (non-embedding matmuls, plus the head) + attention (PaLM appendix B)."""
        n = self.num_params(embeddings=False) + self.vocab_size * self.dim
        attn = 12 * self.n_layers * self.dim * seq_len  # QK^T and AV, fwd+bwd, full (not causal-halved)
        return 6 * n + attn

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**asdict(PRESETS[name]), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # Trains on a 2-core CPU in minutes; GQA (6 query heads over 2 KV heads) so every path is exercised.
    "tiny": ModelConfig(),
    # Llama 3.2 1B (published shape; its long-context rope scaling is not implemented).
    "llama3_1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                             vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0,
                             max_seq_len=8192, tie_embeddings=True),
    # Llama 3 8B.
    "llama3_8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                             vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0,
                             max_seq_len=8192, tie_embeddings=False),
}
