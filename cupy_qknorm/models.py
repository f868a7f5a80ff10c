"""Presets of the open models whose attention normalizes q and k over the FULL row (all
heads together, not per head), the norm this package computes: their widths, KV heads,
head_dim, eps and rotary embedding, so that a user builds the op with the model's name.

    TPQKNorm.for_model("minimax-m2", comm, max_tokens=8192)

Every number comes from the model's config.json on Hugging Face (the URL in its row):
num_attention_heads, num_key_value_heads, head_dim (or hidden_size / num_attention_heads),
rms_norm_eps, rope_theta, rotary_dim (MiniMax; the others rotate the whole head),
rope_scaling and max_position_embeddings. Rotary style: MiniMax and OLMo rotate halves
(Hugging Face's rotate_half, NeoX style). Where a row says "cross-checked", its numbers
were compared with copies of that config in other public code; the others are as the
config was published and should be compared with it before production use.

A model whose RoPE this package cannot express (OLMo 3's YaRN scaling on its full-
attention layers) has rope None here: its preset runs the norm alone, and the engine
rotates after it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .rope import RoPE
from .shapes import MAX_WORLD, kv_layout


@dataclass(frozen=True)
class Model:
    """One model's QK norm: q has `heads` heads and k `kv_heads` heads of `head_dim`;
    eps; and its rotary embedding (None: the norm alone). `note`: what the preset leaves
    out."""
    name: str
    hf_id: str
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope: RoPE | None
    note: str = ""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def k_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def config_url(self) -> str:
        return f"https://huggingface.co/{self.hf_id}/blob/main/config.json"

    def layout(self, world: int) -> str:
        """How its heads lie over `world` ranks: "split" (whole q and k heads on every
        rank), "replicated" (whole q heads; each KV head on world / kv_heads ranks), or ""
        (not evenly: refused)."""
        if not 1 <= world <= MAX_WORLD or self.heads % world:
            return ""
        return kv_layout(world, self.kv_heads)

    def worlds(self) -> list:
        """The G (1..MAX_WORLD) this model runs at."""
        return [g for g in range(1, MAX_WORLD + 1) if self.layout(g)]

    def local_dims(self, world: int) -> tuple:
        """(q_local, k_local) of one rank at `world` ranks."""
        if not self.layout(world):
            raise ValueError(self.refusal(world))
        return self.q_dim // world, self.head_dim * max(1, self.kv_heads // world)

    def refusal(self, world: int) -> str:
        return (f"{self.name} ({self.heads} q heads, {self.kv_heads} KV heads of "
                f"{self.head_dim}) does not run at G={world}: its heads neither split nor "
                f"replicate evenly there; G = {', '.join(map(str, self.worlds()))} do")


def _minimax(name, hf_id, positions, note=""):
    # MiniMax M2 family: 48 q heads, 8 KV heads of 128, rms_norm_eps 1e-6, rotary_dim 64 of
    # each head in NeoX style, rope_theta 5e6; qk_norm_type "per_layer" (the full row)
    return Model(name, hf_id, 48, 8, 128, 1e-6,
                 RoPE(128, 64, theta=5e6, style="neox", max_position=positions), note)


def _full_rope(theta, positions):
    return RoPE(128, 128, theta=theta, style="neox", max_position=positions)


MODELS = {m.name: m for m in (
    # https://huggingface.co/MiniMaxAI/MiniMax-M2/blob/main/config.json: 196608 positions
    # (cross-checked)
    _minimax("minimax-m2", "MiniMaxAI/MiniMax-M2", 196608),
    # https://huggingface.co/MiniMaxAI/MiniMax-M2.1/blob/main/config.json and
    # https://huggingface.co/MiniMaxAI/MiniMax-M2.5/blob/main/config.json: M2's
    # architecture and 196608 positions (not cross-checked)
    _minimax("minimax-m2.1", "MiniMaxAI/MiniMax-M2.1", 196608),
    _minimax("minimax-m2.5", "MiniMaxAI/MiniMax-M2.5", 196608),
    # https://huggingface.co/MiniMaxAI/MiniMax-M2.7/raw/main/config.json: 204800 positions,
    # the rest as M2 (cross-checked)
    _minimax("minimax-m2.7", "MiniMaxAI/MiniMax-M2.7", 204800),
    # OLMo 2 (Olmo2Attention: q_norm over num_heads * head_dim, k_norm over num_kv_heads *
    # head_dim; rotate_half over the whole head; no rope_scaling)
    # https://huggingface.co/allenai/OLMo-2-1124-7B/blob/main/config.json: hidden 4096,
    # 32 heads, 32 KV heads, rms_norm_eps 1e-6, rope_theta 500000, 4096 positions
    Model("olmo-2-7b", "allenai/OLMo-2-1124-7B", 32, 32, 128, 1e-6,
          _full_rope(500000.0, 4096)),
    # https://huggingface.co/allenai/OLMo-2-1124-13B/blob/main/config.json: hidden 5120,
    # 40 heads, 40 KV heads, rms_norm_eps 1e-6, rope_theta 500000, 4096 positions
    Model("olmo-2-13b", "allenai/OLMo-2-1124-13B", 40, 40, 128, 1e-6,
          _full_rope(500000.0, 4096)),
    # https://huggingface.co/allenai/OLMo-2-0325-32B/blob/main/config.json: hidden 5120,
    # 40 heads, 8 KV heads, rms_norm_eps 1e-6, rope_theta 500000, 4096 positions
    Model("olmo-2-32b", "allenai/OLMo-2-0325-32B", 40, 8, 128, 1e-6,
          _full_rope(500000.0, 4096)),
    # OLMo 3: OLMo 2's attention; rope_scaling YaRN (factor 8 from 8192 positions to
    # 65536) on the full-attention layers, plain RoPE on the sliding-window ones
    # https://huggingface.co/allenai/Olmo-3-1025-7B/blob/main/config.json: hidden 4096,
    # 32 heads, 32 KV heads, rms_norm_eps 1e-6, rope_theta 500000 (cross-checked)
    Model("olmo-3-7b", "allenai/Olmo-3-1025-7B", 32, 32, 128, 1e-6, None,
          "YaRN RoPE: the norm alone"),
    # https://huggingface.co/allenai/Olmo-3-1125-32B/blob/main/config.json: hidden 5120,
    # 40 heads, 8 KV heads, rms_norm_eps 1e-6, rope_theta 500000
    Model("olmo-3-32b", "allenai/Olmo-3-1125-32B", 40, 8, 128, 1e-6, None,
          "YaRN RoPE: the norm alone"),
    # OLMoE (OlmoeAttention: q_norm over hidden_size, k_norm over num_kv_heads * head_dim)
    # https://huggingface.co/allenai/OLMoE-1B-7B-0924/blob/main/config.json: hidden 2048,
    # 16 heads, 16 KV heads, rms_norm_eps 1e-5, rope_theta 10000, 4096 positions
    Model("olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", 16, 16, 128, 1e-5,
          _full_rope(10000.0, 4096)),
)}


def get(name: str) -> Model:
    """The preset named `name` (case-insensitive), or ValueError listing them."""
    model = MODELS.get(str(name).lower())
    if model is None:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(MODELS)}")
    return model
