"""flashdispatch.nn: modules built on flashdispatch.attention.

`MultiheadAttention` is a drop-in for torch.nn.MultiheadAttention that runs its attention through
the dispatcher, with grouped-query attention (num_kv_heads) on top. With num_kv_heads equal to
num_heads it has the same parameters, under the same names, as torch's module, so state_dicts
load both ways, and it works inside torch.nn.TransformerEncoderLayer, TransformerDecoderLayer and
nn.Transformer, in training and in inference.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .api import attention

__all__ = ["MultiheadAttention"]

log = logging.getLogger("flashdispatch")


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch.nn.MultiheadAttention's mask convention as an additive float mask: a bool mask is True
    where attention is NOT allowed (-inf there), a float mask is added to the scores."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"mask: expected a bool or floating-point tensor, got {mask.dtype}")
    return mask.to(dtype)


class MultiheadAttention(nn.Module):
    """Multi-head (and grouped-query) attention through `flashdispatch.attention`.

    Arguments as torch.nn.MultiheadAttention, plus:
        num_kv_heads: heads of the key/value projections (GQA/MQA); num_heads must be a multiple.
            None means num_heads (plain multi-head attention, torch's parameter layout).
        backend: force a flashdispatch backend for this module ("sdpa", "triton", ...); None
            lets the dispatcher choose.
        window: sliding window (left, right) of every call, flash_attn's convention as in
            `flashdispatch.attention` (Mistral's 4096 window: (4095, 0) with is_causal=True).
        softcap: logit soft-cap c > 0 of every call (scores become c * tanh(s / c); Gemma 2).

    Calls with need_weights=False and no mask (or is_causal=True) run through
    flashdispatch.attention. A key_padding_mask, an attn_mask that is not the causal hint, or
    need_weights=True (the default, as in torch's module) need the
    attention matrix, which the dispatcher's kernels never form: those calls compute attention in
    plain PyTorch from the same projections (as torch's module would), or raise ValueError when the
    module has a forced `backend`. Not supported (ValueError naming the argument): dropout > 0,
    add_bias_kv, add_zero_attn.

    Inside torch.nn.TransformerEncoderLayer in inference, torch's fused fast path reads the
    module's weights directly (as it does for its own module; merge_masks serves it) unless
    num_kv_heads != num_heads; torch.backends.mha.set_fastpath_enabled(False) keeps every call on
    this module's forward.

    Parameters (E = embed_dim, Dh = E // num_heads, Ekv = num_kv_heads * Dh):
        in_proj_weight (E + 2 * Ekv, E) and in_proj_bias (E + 2 * Ekv) when kdim == vdim == E;
        otherwise q_proj_weight (E, E), k_proj_weight (Ekv, kdim), v_proj_weight (Ekv, vdim);
        out_proj: Linear(E, E).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_kv_heads: int | None = None,
        backend: str | None = None,
        window: tuple[int, int] | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        from .problem import check_softcap, check_window

        # checked here, with the same messages attention() gives, so that a bad module fails when built
        self.window = check_window(window)
        self.softcap = check_softcap(softcap)
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads: expected positive integers, got {embed_dim} and {num_heads}"
            )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim: expected a multiple of num_heads={num_heads}, got {embed_dim}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads: expected a positive divisor of num_heads={num_heads}, got {num_kv_heads}"
            )
        if dropout != 0.0:
            raise ValueError(f"dropout: expected 0.0 (the dispatcher's kernels have no dropout), got {dropout}")
        if add_bias_kv:
            raise ValueError("add_bias_kv: expected False (not supported), got True")
        if add_zero_attn:
            raise ValueError("add_zero_attn: expected False (not supported), got True")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        # one packed in_proj_weight (else separate q/k/v weights); torch's attribute of the same name
        # means a packed weight of torch's (3E, E) layout, which torch's fused inference path reads:
        # a GQA packing is not that layout (see _qkv_same_embed_dim below)
        self._packed = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kv_embed_dim = num_kv_heads * self.head_dim
        self.dropout = dropout
        self.batch_first = batch_first
        self.backend = backend
        # torch's module has these attributes; code that inspects them keeps working
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False

        if self._packed:
            self.in_proj_weight = nn.Parameter(
                torch.empty((embed_dim + 2 * self.kv_embed_dim, embed_dim), **factory)
            )
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((self.kv_embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((self.kv_embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * self.kv_embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    @property
    def _qkv_same_embed_dim(self) -> bool:
        """torch's flag: in_proj_weight packs q, k, v in torch's (3E, E) layout. False for GQA, so
        that torch's fused inference path (which assumes that layout) leaves this module's forward
        in charge."""
        return self._packed and self.num_kv_heads == self.num_heads

    def merge_masks(
        self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, query: torch.Tensor
    ) -> tuple[torch.Tensor | None, int | None]:
        """torch.nn.MultiheadAttention.merge_masks' contract, which torch's fused encoder-layer path
        calls: (mask, type) with type 0 for an (L, S) attn_mask alone, 1 for an (N, S)
        key_padding_mask alone, 2 for both merged into (N, num_heads, L, S); (None, None) for none.
        query is (N, L, E)."""
        if attn_mask is None:
            return (key_padding_mask, 1) if key_padding_mask is not None else (None, None)
        n, l = query.shape[0], query.shape[1]
        if attn_mask.dim() == 3:  # (N * num_heads, L, S)
            full = attn_mask.view(n, self.num_heads, l, -1)
        else:
            full = attn_mask.view(1, 1, l, -1).expand(n, self.num_heads, l, -1)
        if key_padding_mask is not None:
            full = full + key_padding_mask.view(n, 1, 1, -1).expand(-1, self.num_heads, -1, -1)
        return full, 2

    def _reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialisation, so that both modules start alike
        if self._packed:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def extra_repr(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        extra = (f", window={self.window}" if self.window is not None else "") + (
            f", softcap={self.softcap:g}" if self.softcap is not None else "")
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{kv}, batch_first={self.batch_first}{extra}"

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, self_attention: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e, ekv = self.embed_dim, self.kv_embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:e + ekv], b[e + ekv:])
        if self._packed:
            w = self.in_proj_weight
            if self_attention:
                # self-attention: one matmul, then views into its output
                qkv = F.linear(query, w, b)
                return qkv[..., :e], qkv[..., e:e + ekv], qkv[..., e + ekv:]
            wq, wk, wv = w[:e], w[e:e + ekv], w[e + ekv:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of `query` over `key`/`value`; returns (attn_output, attn_weights or None).

        Shapes: (L, N, E) / (S, N, kdim) / (S, N, vdim), or (N, L, E) ... with batch_first, or
        unbatched (L, E) / (S, kdim) / (S, vdim). attn_output has query's shape.

        Masks follow torch's module: key_padding_mask (N, S) or (S,), attn_mask (L, S) or
        (N * num_heads, L, S); bool True means "may not attend", a float mask is added to the
        scores. is_causal=True applies the causal mask; an attn_mask given with it is, as in torch,
        a hint: not read when need_weights=False and there is no key_padding_mask (the kernels
        take the causal mask), applied otherwise. is_causal=True without a mask is allowed here.
        For L != S our causal mask is bottom-right aligned (query i sees key j iff j <= i + S - L),
        where torch's SDPA aligns top-left. need_weights defaults to True, as in torch's module: the weights
        (averaged over heads when average_attn_weights) are returned, computed in plain PyTorch;
        pass need_weights=False for the dispatcher's kernels (torch's fast path asks the same).
        """
        if query.dim() not in (2, 3):
            raise ValueError(f"query: expected a 2-d (unbatched) or 3-d tensor, got shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"key/value: expected {query.dim()}-d tensors like query, got shapes "
                f"{tuple(key.shape)} and {tuple(value.shape)}"
            )
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query: expected last dimension embed_dim={self.embed_dim}, got {query.shape[-1]}")
        masked = key_padding_mask is not None or need_weights or (attn_mask is not None and not is_causal)
        if masked and self.backend is not None:
            what = ("key_padding_mask" if key_padding_mask is not None else
                    "need_weights" if need_weights else "attn_mask")
            raise ValueError(
                f"{what}: the forced backend {self.backend!r} takes no mask and forms no weights; "
                "expected no mask (or is_causal=True) and need_weights=False, or backend=None"
            )
        self_attention = query is key and key is value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None and key_padding_mask.dim() == 1:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            # (L, N, E) -> (N, L, E) views: the projections and the bshd call accept any strides
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, l, _ = query.shape
        q, k, v = self._project(query, key, value, self_attention)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        weights = None
        if masked:
            # as torch's module: on this path a given attn_mask is applied, is_causal being only its
            # hint; is_causal without a mask (this module's extension) builds the causal mask
            out, weights = self._masked_attention(q, k, v, attn_mask, key_padding_mask,
                                                  is_causal and attn_mask is None, need_weights, average_attn_weights)
        else:
            out = attention(
                q, k, v, causal=is_causal, scale=1.0 / math.sqrt(self.head_dim), layout="bshd",
                backend=self.backend, window=self.window, softcap=self.softcap,
            )
        out = self.out_proj(out.reshape(n, l, self.embed_dim))
        if unbatched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _masked_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None, is_causal: bool, need_weights: bool, average: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention in plain PyTorch for what the dispatcher's kernels do not take: masks and
        weights. q (N, L, H, Dh), k/v (N, S, Hkv, Dh) -> out (N, L, H, Dh) and weights."""
        n, l, h, dh = q.shape
        s_len = k.shape[1]
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        g = self.num_heads // self.num_kv_heads
        qh = q.transpose(1, 2).to(acc)
        kh = k.transpose(1, 2).to(acc).repeat_interleave(g, dim=1)
        vh = v.transpose(1, 2).to(acc).repeat_interleave(g, dim=1)
        scores = torch.matmul(qh, kh.transpose(-1, -2)) * (1.0 / math.sqrt(dh))  # (N, H, L, S)
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        if is_causal or self.window is not None:  # bottom-right causal and/or the module's window
            from .reference import visible_mask

            keep = visible_mask(l, s_len, causal=is_causal, window=self.window, device=q.device)
            scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            m = _additive(attn_mask, acc)
            if m.dim() == 3:
                if m.shape[0] != n * h:
                    raise ValueError(
                        f"attn_mask: expected (L, S) or (N * num_heads, L, S) = ({n * h}, {l}, {s_len}), "
                        f"got {tuple(attn_mask.shape)}"
                    )
                m = m.view(n, h, l, s_len)
            elif m.shape != (l, s_len):
                raise ValueError(f"attn_mask: expected (L, S) = ({l}, {s_len}), got {tuple(attn_mask.shape)}")
            scores = scores + m
        if key_padding_mask is not None:
            if key_padding_mask.shape != (n, s_len):
                raise ValueError(
                    f"key_padding_mask: expected (N, S) = ({n}, {s_len}), got {tuple(key_padding_mask.shape)}"
                )
            scores = scores + _additive(key_padding_mask, acc).view(n, 1, 1, s_len)
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, vh).to(q.dtype).transpose(1, 2)
        weights = None
        if need_weights:
            weights = (probs.mean(dim=1) if average else probs).to(q.dtype)
        return out, weights
