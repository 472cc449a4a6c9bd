"""A torch-only Qwen2 decoder for ``gpu_check.py`` when transformers is not installed.

Same parameter names and math as HF ``Qwen2ForCausalLM`` (RMSNorm in float32, RoPE, GQA attention
with q/k/v biases through ``scaled_dot_product_attention``, SwiGLU MLP, untied lm_head), and the
small part of its interface that :mod:`aapo_ray.logprobs` uses (``get_decoder``,
``get_output_embeddings``, ``gradient_checkpointing_enable``, ``config``). Per-layer
checkpointing uses ``torch.utils.checkpoint`` with ``use_reentrant=False`` as HF does.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads, self.kv_heads, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.hd, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.hd, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.hd, bias=True)
        self.o_proj = nn.Linear(self.heads * self.hd, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config, self.gradient_checkpointing = c, False
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        b, s = input_ids.shape
        x = self.embed_tokens(input_ids)
        hd = self.config.head_dim
        inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
        freqs = torch.outer(torch.arange(s, device=x.device, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:  # padded keys hidden; a padded query sees itself (no NaN rows)
            mask = (mask & attention_mask.bool()[:, None, None, :]) | torch.eye(s, dtype=torch.bool, device=x.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return SimpleNamespace(last_hidden_state=self.norm(x))


class Qwen2ForCausalLM(nn.Module):
    """``Qwen2ForCausalLM(config)`` with ``config`` holding the HF config.json fields."""

    supports_gradient_checkpointing = True

    def __init__(self, config):
        super().__init__()
        c = SimpleNamespace(**{"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "use_cache": False, **vars(config)})
        c.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.config = c
        self.model = Qwen2Model(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def get_decoder(self):
        return self.model

    def get_output_embeddings(self):
        return self.lm_head

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.model.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        hidden = self.model(input_ids, attention_mask).last_hidden_state
        return SimpleNamespace(logits=self.lm_head(hidden))
