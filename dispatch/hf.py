"""flashdispatch.hf: flashdispatch as a Hugging Face transformers attention implementation.

    import flashdispatch.hf
    flashdispatch.hf.register()            # once per process; safe to repeat
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="flashdispatch")

Packed batches (transformers' padding-free path: one row of several sequences, with position_ids
restarting at 0 or cu_seq_lens_q/k in the kwargs) run through `flashdispatch.attention_varlen`,
each sequence causal on its own; the block-diagonal mask transformers builds for them is then
not needed.

`register()` adds `attention_forward` to transformers' AttentionInterface and gives the name a
mask builder that hands over no mask at all when the mask would be plain causal or a plain causal
sliding window (no padding): the window then travels as the `sliding_window` argument that the
models pass to attention functions. Calls that flashdispatch's contract covers (no mask, causal,
a sliding window (Mistral, Gemma 2, gpt-oss), logit softcapping (Gemma 2), attention sinks (gpt-oss,
`s_aux`); any GQA ratio; no dropout) run through `flashdispatch.attention`; everything else — a
padding mask, attention dropout in training, a position bias — goes to transformers' own sdpa
function, and the reason is logged once per process (logger "flashdispatch", level WARNING).

transformers' sliding_window=W means a query sees itself and the W - 1 keys before it (its masks:
kv_idx > q_idx - W), which is window=(W - 1, 0) with causal=True.

transformers is imported only inside these functions: `import flashdispatch` never loads it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .api import attention
from .serving import attention_varlen

log = logging.getLogger("flashdispatch")

NAME = "flashdispatch"

# kwargs of transformers' attention functions that change the math beyond the contract
_UNSUPPORTED_KWARGS: tuple[tuple[str, str], ...] = (
    ("position_bias", "a position bias (T5-style) added to the scores"),
)

_reported: set[str] = set()
# names registered through register() that transformers would take for flash-attn kernels
_own_names: set[str] = set()


def register(name: str = NAME) -> str:
    """Register flashdispatch with transformers under `name`; returns the name.

    Raises ImportError (with the install command) when transformers is missing.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError(
            f"flashdispatch.hf.register: transformers is needed (pip install transformers): {e}"
        ) from e
    AttentionInterface.register(name, attention_forward)
    # the sdpa mask builder returns None for a plain causal mask: that is the case we serve; for a
    # sliding-window layer it is asked as if the layer were global, so that it also returns None
    # when only the window would be in the mask (the window comes as sliding_window)
    AttentionMaskInterface.register(name, mask_without_window)
    _skip_flash_kernel_loading(name)
    return name


def mask_without_window(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' sdpa mask builder, asked without the sliding window's size (`local_size`).

    sdpa_mask keeps a mask whenever a window is shorter than the keys; without local_size it
    returns None exactly when the rest of the mask is plain causal (no padding, no packed
    sequences). When it does build a mask, the mask function still holds the window, so the mask
    is the whole truth and attention_forward hands it to sdpa.
    """
    from transformers.masking_utils import sdpa_mask

    kwargs.pop("local_size", None)
    return sdpa_mask(*args, **kwargs)


def _not_flash_in_model_loading(mu: Any) -> None:
    """Model loading (transformers.modeling_utils) asks whether a flash kernel was requested; for
    our names the answer is no. Otherwise a model that lists its own flash kernels (gpt-oss:
    `_compatible_flash_implementations`) replaces "flashdispatch" by one of those, downloaded
    from the Hub. Other modules of transformers keep their own answer."""
    check = getattr(mu, "is_flash_attention_requested", None)
    if check is None or getattr(check, "_flashdispatch_wrapped", False):
        return

    def is_flash_attention_requested(config: Any = None, requested_attention_implementation: str | None = None,
                                     *args: Any, **kwargs: Any) -> bool:
        name = requested_attention_implementation
        if name is None and config is not None:
            name = getattr(config, "_attn_implementation", None)
        if name in _own_names:
            return False
        return check(config, requested_attention_implementation, *args, **kwargs)

    is_flash_attention_requested._flashdispatch_wrapped = True  # type: ignore[attr-defined]
    mu.is_flash_attention_requested = is_flash_attention_requested


def _skip_flash_kernel_loading(name: str) -> None:
    """Stop transformers from looking for a flash-attn kernel called `name`.

    transformers 5 takes every implementation name that contains "flash" for a flash-attention
    kernel and, when a model is built, loads it through `lazy_import_flash_attention` (from the
    flash_attn package or the Hub), which fails for "flashdispatch". That loader (whose result
    model construction ignores) is wrapped here to return nothing for names registered through
    this module and to defer to transformers for every other name; the attention function itself
    comes from AttentionInterface as for any registered name. Versions without the loader are left
    alone.
    """
    import transformers.modeling_utils as mu

    try:
        from transformers.utils.generic import is_flash_attention_requested
    except ImportError:  # versions without the helper: wrap anyway (a no-op for other names)
        pass
    else:
        if not is_flash_attention_requested(requested_attention_implementation=name):
            return
    _own_names.add(name)
    _not_flash_in_model_loading(mu)
    loader = getattr(mu, "lazy_import_flash_attention", None)
    if loader is None or getattr(loader, "_flashdispatch_wrapped", False):
        return

    def lazy_import_flash_attention(implementation: str | None, *args: Any, **kwargs: Any) -> Any:
        if implementation in _own_names:
            return None
        return loader(implementation, *args, **kwargs)

    lazy_import_flash_attention._flashdispatch_wrapped = True  # type: ignore[attr-defined]
    mu.lazy_import_flash_attention = lazy_import_flash_attention


def fallback_reason(
    attention_mask: torch.Tensor | None, dropout: float, kwargs: dict[str, Any]
) -> str | None:
    """Why this call goes to transformers' sdpa instead (None: flashdispatch serves it)."""
    if attention_mask is not None:
        return (
            "an attention mask was given (padding, sliding window, packed sequences or a cache "
            "prefix); flashdispatch takes no mask"
        )
    if dropout:
        return f"attention dropout {dropout} (training); flashdispatch has no dropout"
    for key, what in _UNSUPPORTED_KWARGS:
        if kwargs.get(key) is not None:
            return f"{what}; flashdispatch does not support it"
    return None


def packed_sequences(query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]
                     ) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """(cu_seqlens_q, cu_seqlens_k, max_q, max_k) of a packed row, or None when the call is not one.

    A packed row: batch 1, no cache prefix (Sk == Sq), and either cu_seq_lens_q/k in the kwargs
    or position_ids that restart at 0 and count up by one inside each sequence. Reads the
    positions on the host (eager calls only; under torch.compile the mask path runs instead)."""
    if query.shape[0] != 1 or key.shape[2] != query.shape[2] or torch.compiler.is_compiling():
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if isinstance(cu_q, torch.Tensor) and isinstance(cu_k, torch.Tensor):
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        max_q = int(kwargs.get("max_length_q") or int(cu_q.diff().max()))
        max_k = int(kwargs.get("max_length_k") or int(cu_k.diff().max()))
        return cu_q, cu_k, max_q, max_k
    pos = kwargs.get("position_ids")
    s = query.shape[2]
    if not isinstance(pos, torch.Tensor) or pos.numel() != s or s < 2:
        return None
    pos = pos.reshape(-1)
    starts = (pos == 0).nonzero().view(-1)
    if starts.numel() < 2 or int(starts[0]) != 0:
        return None  # one sequence (the dense path serves it) or not a packed row
    cu = torch.cat([starts, starts.new_tensor([s])])
    lens = cu.diff()
    # positions must count 0, 1, ... inside every sequence
    expected = torch.arange(s, device=pos.device) - torch.repeat_interleave(starts, lens)
    if not torch.equal(pos.to(expected.dtype), expected):
        return None
    cu = cu.to(device=query.device, dtype=torch.int32)
    longest = int(lens.max())
    return cu, cu, longest, longest


def _report(reason: str) -> None:
    if reason not in _reported:
        _reported.add(reason)
        log.warning("flashdispatch.hf: falling back to sdpa: %s", reason)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (as its sdpa_attention_forward).

    query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D/Dv) — GQA heads are not repeated; returns
    (attn_output (B, Sq, Hq, Dv) contiguous, None).
    """
    sliding_window = kwargs.pop("sliding_window", None)
    softcap = kwargs.pop("softcap", None)
    s_aux = kwargs.pop("s_aux", None)
    packed = None if dropout or any(kwargs.get(k) is not None for k, _ in _UNSUPPORTED_KWARGS) else (
        packed_sequences(query, key, kwargs))
    if packed is not None:
        cu_q, cu_k, max_q, max_k = packed
        causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        out = attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scaling,
                               window=(int(sliding_window) - 1, 0) if sliding_window else None,
                               softcap=float(softcap) if softcap else None,
                               sinks=s_aux.float() if s_aux is not None else None)
        return out.unsqueeze(0).contiguous(), None  # type: ignore[union-attr]
    reason = fallback_reason(attention_mask, dropout, kwargs)
    if reason is not None:
        if not torch.compiler.is_compiling():
            _report(reason)
        return _transformers_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                      sliding_window, softcap, s_aux, kwargs)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    sq, sk = query.shape[2], key.shape[2]
    # an `if` on the shape, so that dynamic shapes under torch.compile give a bool, not a SymBool
    causal = bool(is_causal) if sq > 1 else False
    if causal and sk > sq:
        # transformers drops the mask for causal calls only when the keys beyond the queries are
        # empty slots (a static cache at prefill): sdpa crops them, and so must we, since our
        # bottom-right alignment would otherwise attend to them
        key, value = key[:, :, :sq], value[:, :, :sq]
    # sliding_window=W: the query and the W - 1 keys before it; bottom-right aligned like the cache
    window = (int(sliding_window) - 1, 0) if sliding_window else None
    sinks = s_aux.float() if s_aux is not None else None  # a bf16 model's parameter; the cast passes grads
    out = attention(query, key, value, causal=causal, scale=scaling, window=window,
                    softcap=float(softcap) if softcap else None, sinks=sinks)
    return out.transpose(1, 2).contiguous(), None


def _transformers_fallback(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float, scaling: float | None, is_causal: bool | None,
    sliding_window: int | None, softcap: float | None, s_aux: torch.Tensor | None, kwargs: dict[str, Any],
) -> tuple[torch.Tensor, Any]:
    """A call flashdispatch does not serve: transformers' sdpa function, or its eager one when
    softcap or sinks are in play (sdpa has neither). The mask builder dropped a pure window from
    the mask; it is put back here, where transformers' functions need it."""
    if sliding_window and attention_mask is None:
        from .reference import visible_mask

        attention_mask = visible_mask(query.shape[2], key.shape[2], causal=True,
                                      window=(int(sliding_window) - 1, 0), device=query.device)[None, None]
    if softcap or s_aux is not None:
        import importlib

        eager = getattr(importlib.import_module(type(module).__module__), "eager_attention_forward")
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            # eager functions add the mask to the scores
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min)
        extra = dict(kwargs)
        if softcap:
            extra["softcap"] = softcap
        if s_aux is not None:
            extra["s_aux"] = s_aux
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     sliding_window=sliding_window, **extra)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)
