"""Sparse self-attention processors for Wan, HunyuanVideo and CogVideoX, and their installer.

    >>> import accel
    >>> from accel.attention import SparseAttentionConfig
    >>> from pipelines.tiny import build_tiny
    >>> pipe = build_tiny("wan")
    >>> plan = SparseAttentionConfig.uniform("WanTransformer3DModel", grid=(2, 1, 1), layers=2, heads=2,
    ...                                      mode="diag", r=0, block=16)
    >>> with accel.applying(pipe, plan):
    ...     video = pipe("a red circle", **pipe.tiny_call_kwargs).frames

Each processor re-implements its stock ``__call__`` (projections, QK-norm, RoPE, output projection
or split) and replaces only the attention call with :meth:`SparseLayer.attend`. Dense steps (the
warm-up fraction of the plan, read from the core's step tracker) and calls on another token grid
(with ``on_grid_mismatch="dense"``) hand the call to the stock processor unchanged. Cross-attention
(Wan ``attn2``), Hunyuan's token refiner and layers not in the plan are never touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _compat
from ..adapters import ModelAdapter
from ..api import register_plugin
from ..errors import ConfigError, UnsupportedModelError
from .layer import SparseLayer
from .plan import SparseAttentionConfig


class _Gate:
    """Whether the current call runs dense: warm-up steps per the plan, from the step tracker."""

    def __init__(self, tracker, plan: SparseAttentionConfig):
        self.tracker, self.plan = tracker, plan
        self.sparse_calls = 0
        self.dense_calls = 0

    def dense(self) -> bool:
        t = self.tracker
        n = t.num_inference_steps
        if n is None and t.scheduler is not None and getattr(t.scheduler, "timesteps", None) is not None:
            n = len(t.scheduler.timesteps)
        return n is not None and t.step < self.plan.dense_steps(n)


class _SparseProcessor:
    stock_class: type = object
    text_position = "none"

    def __init__(self, stock, layer: SparseLayer, gate: _Gate, plan: SparseAttentionConfig, name: str):
        self.stock, self.layer, self.gate, self.plan, self.name = stock, layer, gate, plan, name
        # the stock processor's backend settings, read by the dense calls
        self._attention_backend = getattr(stock, "_attention_backend", None)
        self._parallel_config = getattr(stock, "_parallel_config", None)

    def _use_stock(self, n_video: int) -> bool:
        if self.gate.dense():
            self.gate.dense_calls += 1
            return True
        if n_video != self.layer.grid.tokens:
            if self.plan.on_grid_mismatch == "dense":
                self.gate.dense_calls += 1
                return True
            g = self.layer.grid
            raise ConfigError(
                f"{self.name}: the plan is for a {g.frames}x{g.height}x{g.width} token grid ({g.tokens} video "
                f"tokens) but the input has {n_video} video tokens; make a plan for this resolution/frame count "
                f"or set on_grid_mismatch='dense'"
            )
        self.gate.sparse_calls += 1
        return False

    def _dispatch(self, mask):
        def dense(q, k, v):
            return _compat.dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                                 backend=self._attention_backend, parallel_config=self._parallel_config)
        return dense


class SparseWanAttnProcessor(_SparseProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or self._use_stock(hidden_states.shape[1]):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _compat.wan_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _wan_rope(query, *rotary_emb), _wan_rope(key, *rotary_emb)
        out = self.layer.attend(query, key, value, self._dispatch(attention_mask))
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_rope(x, cos, sin):
    # Wan's interleaved-pair rotation, as its stock processor computes it
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


class SparseHunyuanVideoAttnProcessor(_SparseProcessor):
    text_position = "suffix"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        n_v = hidden_states.shape[1]
        if self._use_stock(n_v):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        single = attn.add_q_proj is None and encoder_hidden_states is not None
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            rope = _compat.apply_rotary_emb
            if single:
                query = torch.cat([rope(query[:, :n_v], image_rotary_emb, sequence_dim=1), query[:, n_v:]], dim=1)
                key = torch.cat([rope(key[:, :n_v], image_rotary_emb, sequence_dim=1), key[:, n_v:]], dim=1)
            else:
                query = rope(query, image_rotary_emb, sequence_dim=1)
                key = rope(key, image_rotary_emb, sequence_dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ek = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], 1), torch.cat([key, ek], 1), torch.cat([value, ev], 1)
        text = slice(n_v, None) if query.shape[1] > n_v else None
        len_t = None
        if text is not None and attention_mask is not None:
            # right-padded text: its valid length is the count of true key-mask entries
            len_t = attention_mask.reshape(attention_mask.shape[0], -1)[:, n_v:].sum(-1).to(torch.int32)
        out = self.layer.attend(query, key, value, self._dispatch(attention_mask), slice(0, n_v), text, len_t)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        out, context = out[:, :n_v], out[:, n_v:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            context = attn.to_add_out(context)
        return out, context


class SparseCogVideoXAttnProcessor(_SparseProcessor):
    text_position = "prefix"

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None or self._use_stock(hidden_states.shape[1]):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        n_t = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        z = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(z, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(z, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(z, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, n_t:] = _compat.apply_rotary_emb(query[:, :, n_t:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, n_t:] = _compat.apply_rotary_emb(key[:, :, n_t:], image_rotary_emb)

        def dense(q, k, v):   # the stock call, in [Z, S, H, D] views of its [Z, H, S, D] tensors
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  dropout_p=0.0, is_causal=False).transpose(1, 2)

        out = self.layer.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dense,
                                slice(n_t, None), slice(0, n_t) if n_t else None)
        out = out.reshape(z, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        context, out = out.split([n_t, out.size(1) - n_t], dim=1)
        return out, context


def _stock_classes() -> dict[str, tuple[type, type]]:
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    return {
        "WanTransformer3DModel": (WanAttnProcessor, SparseWanAttnProcessor),
        "HunyuanVideoTransformer3DModel": (HunyuanVideoAttnProcessor2_0, SparseHunyuanVideoAttnProcessor),
        "CogVideoXTransformer3DModel": (CogVideoXAttnProcessor2_0, SparseCogVideoXAttnProcessor),
    }


class SparseHandle:
    def __init__(self, installed: list[tuple[torch.nn.Module, object]], gate: _Gate):
        self.installed, self.gate = installed, gate

    def remove(self) -> None:
        for module, stock in reversed(self.installed):
            module.set_processor(stock)
        self.installed = []

    def reset(self) -> None:
        self.gate.sparse_calls = self.gate.dense_calls = 0

    def stats(self) -> dict:
        return {"attention_sparse_calls": self.gate.sparse_calls, "attention_dense_calls": self.gate.dense_calls}


@register_plugin(SparseAttentionConfig)
def _install(model, plan: SparseAttentionConfig, tracker, adapter: ModelAdapter):
    classes = _stock_classes()
    name = type(model).__name__
    if name not in classes:
        raise UnsupportedModelError(f"sparse attention supports {', '.join(classes)}; got {name}")
    if plan.model_class != name:
        raise ConfigError(f"the plan's model_class is {plan.model_class!r} but the model is {name}")
    stock_cls, sparse_cls = classes[name]
    if plan.text["position"] != sparse_cls.text_position:
        raise ConfigError(f"text.position is {plan.text['position']!r}; {name} self-attention has text "
                          f"{sparse_cls.text_position!r}")
    modules = adapter.self_attention_modules(model)
    gate = _Gate(tracker, plan)
    todo = []
    for index, heads in sorted(plan.head_patterns().items()):
        if index >= len(modules):
            raise ConfigError(f"the plan has layer {index} but {name} has {len(modules)} self-attention layers")
        module_name, module = modules[index]
        listed = next(la.get("module") for la in plan.layers if la["index"] == index)
        if listed is not None and listed != module_name:
            raise ConfigError(f"layers index {index} names module {listed!r}; "
                              f"the model's layer {index} is {module_name}")
        if len(heads) != module.heads:
            raise ConfigError(f"layer {index} ({module_name}) plans {len(heads)} heads; the module has {module.heads}")
        stock = module.processor
        if type(stock) is not stock_cls:
            raise ConfigError(f"{module_name} uses {type(stock).__name__}; sparse attention replaces only the stock "
                              f"{stock_cls.__name__} (fused or custom processors are refused)")
        if getattr(stock, "_parallel_config", None) is not None:
            raise ConfigError(f"{module_name}: context parallelism is not supported by the sparse processors")
        if index in plan.dense_layers:
            continue
        layer = SparseLayer(heads, plan.token_grid, plan.block)
        todo.append((module, sparse_cls(stock, layer, gate, plan, module_name)))
    installed = []
    for module, proc in todo:
        installed.append((module, module.processor))
        module.set_processor(proc)
    return SparseHandle(installed, gate)
