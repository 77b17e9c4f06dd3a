"""SAM attention kernels: drop-in subclasses of transformers' SAM ViT attention (same parameters, same state-dict
keys, so checkpoints are interchangeable) that Encoder swaps in by `VAEConfig.attn_implementation`.

    SamSdpaAttention   "sdpa": SDPA with SAM's decomposed relative-position bias as a dense mask, written once
    SamFlexAttention   "flex": the bias added inside a FlexAttention kernel (a score_mod); no (N, N) mask at all
    flex_attention     torch's flex_attention, compiled once per call class on CUDA
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Callable

import torch
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionSdpaAttention

FLEX_RECOMPILE_LIMIT = 2  # compiles per call class: one with a dynamic batch, one more for a batch of 1
_compiled_flex: dict[tuple, Callable] = {}  # call class -> its own compiled flex_attention
# torch.compile's own keywords, read at import (before a test can patch torch.compile): from torch 2.14 a compiled
# function can have a recompile limit of its own (recompile_limit, isolate_recompiles); torch 2.11 has neither
_OWN_LIMIT = {"recompile_limit", "isolate_recompiles"} <= set(inspect.signature(torch.compile).parameters)
_LIMIT_CONFIG = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Callable,
                   score_tensors: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """torch's flex_attention: compiled on CUDA (a fused kernel, as transformers does it; compiled_flex_attention).
    Elsewhere uncompiled, i.e. torch's reference implementation, which materialises the scores: torch 2.14's
    compiled CPU kernel returned NaN or wrong values, or failed to build, once the shapes changed between calls
    (window and global blocks). q, k, v (B, heads, N, d); score_tensors: the tensors score_mod indexes by batch."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    if not q.is_cuda or torch.compiler.is_compiling():  # inside --compile, inductor fuses it anyway
        return flex(q, k, v, score_mod=score_mod)
    return compiled_flex_attention(q, k, v, score_mod, score_tensors)


def compiled_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Callable,
                            score_tensors: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """flex_attention through one torch.compile per call class: everything dynamo guards on except the batch size
    (shapes after dim 0, dtype, device, grad mode, autocast). Dim 0 is marked dynamic, so a class compiles once
    (twice if it meets a batch of 1, which dynamo specialises): SAM ViT-B has 2 shape classes (window and global
    blocks) x grad / no-grad. Past dynamo's recompile limit a compiled function silently runs eager, which here
    materialises the (B, heads, N, N) scores; each class has its own limit (isolate_recompiles) and fullgraph=True
    makes hitting it raise instead. On a torch without per-function limits (2.11) every class compiles the same code
    object, whose cache dynamo counts as one: there the limit is torch._dynamo.config's, set to FLEX_RECOMPILE_LIMIT
    x the classes met so far, for the call only (a shared budget, not one per class; other compiled code keeps
    its own)."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    tensors = (q, k, v, *score_tensors)
    key = (q.device, q.dtype, torch.is_grad_enabled(), q.requires_grad, torch.is_autocast_enabled(q.device.type),
           *(tuple(t.shape[1:]) for t in tensors))
    if key not in _compiled_flex:
        own = dict(recompile_limit=FLEX_RECOMPILE_LIMIT, isolate_recompiles=True) if _OWN_LIMIT else {}
        _compiled_flex[key] = torch.compile(flex, fullgraph=True, **own)
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)  # the batch (x windows); left static where it is 1
    limit = nullcontext() if _OWN_LIMIT else torch._dynamo.config.patch(
        **{_LIMIT_CONFIG: FLEX_RECOMPILE_LIMIT * len(_compiled_flex)})
    try:
        with limit:
            return _compiled_flex[key](q, k, v, score_mod=score_mod)
    except torch._dynamo.exc.FailOnRecompileLimitHit as e:
        raise RuntimeError(f"flex attention needed more than {FLEX_RECOMPILE_LIMIT} compiles for one call class "
                           f"{key} (see dynamo's 'last reason' above); running it eagerly instead would materialise "
                           f"the attention scores. Use attn_implementation 'sdpa' to go on") from e


class SamSdpaAttention(SamVisionSdpaAttention):
    """transformers' SAM SDPA attention (same parameters, same state-dict keys) whose dense relative-position mask
    (B * heads, H, W, H, W) is written once. transformers' einsums return the two small factors with permuted
    strides, so their broadcast sum comes out permuted too and the reshape to SDPA's (B, heads, N, N) mask copies
    it: two masks alive at once (SAM ViT-B at 1024, batch 4: 2 x 3 GiB per global block). Contiguous factors make
    the sum contiguous and the reshape a view."""

    def get_decomposed_rel_pos(self, query: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                               q_size: tuple[int, int], k_size: tuple[int, int]) -> torch.Tensor:
        (qh, qw), (kh, kw) = q_size, k_size
        rel_pos_h = self.get_rel_pos(qh, kh, rel_pos_h)  # (qh, kh, d)
        rel_pos_w = self.get_rel_pos(qw, kw, rel_pos_w)  # (qw, kw, d)
        q = query.reshape(query.shape[0], qh, qw, -1)  # (B * heads, qh, qw, d)
        rel_h = torch.einsum("bhwc,hkc->bhwk", q, rel_pos_h).contiguous()  # (B * heads, qh, qw, kh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", q, rel_pos_w).contiguous()  # (B * heads, qh, qw, kw)
        return rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]  # (B * heads, qh, qw, kh, kw), contiguous


class SamFlexAttention(SamVisionAttention):
    """transformers' SAM attention (same parameters, same state-dict keys) with the decomposed relative-position
    bias added to the scores inside a FlexAttention kernel (a score_mod) instead of SDPA's dense (B, heads, N, N)
    mask: the bias costs O(N * (H + W)) memory instead of O(N^2), and the kernel tiles like flash attention.
    PyTorch's FlexAttention has no backward on CPU: training with it needs CUDA; inference runs anywhere (on CPU
    without the fused kernel, see flex_attention)."""

    def forward(self, hidden_states: torch.Tensor, output_attentions=None) -> tuple[torch.Tensor, None]:
        B, H, W, _ = hidden_states.shape  # (B, H, W, C): a window (B = batch x windows) or the whole grid
        heads = self.num_attention_heads
        qkv = self.qkv(hidden_states).reshape(B, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, d)
        # the two factors of the bias, as in transformers' get_decomposed_rel_pos (unscaled query)
        rel_pos_h = self.get_rel_pos(H, H, self.rel_pos_h)  # (H, H, d)
        rel_pos_w = self.get_rel_pos(W, W, self.rel_pos_w)  # (W, W, d)
        q_grid = q.reshape(B, heads, H, W, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, rel_pos_h).reshape(B, heads, H * W, H)  # (B, heads, N, H)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, rel_pos_w).reshape(B, heads, H * W, W)  # (B, heads, N, W)

        def score_mod(score, b, h, q_idx, kv_idx):  # key kv_idx sits at row kv_idx // W, column kv_idx % W
            return score + rel_h[b, h, q_idx, kv_idx // W] + rel_w[b, h, q_idx, kv_idx % W]

        out = flex_attention(q, k, v, score_mod, (rel_h, rel_w))  # (B, heads, N, d); SAM's attention dropout is 0
        out = out.transpose(1, 2).reshape(B, H, W, -1)
        return self.proj(out), None
