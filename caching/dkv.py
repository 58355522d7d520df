"""dKV-Cache for masked diffusion LMs: delayed key/value caching, plus Fast-dLLM's block caches.

    >>> import accel
    >>> from caching import DKVCacheConfig
    >>> from pipelines.zoo import load_reference
    >>> pipe = load_reference("dlm-tasks")
    >>> accel.apply(pipe, DKVCacheConfig(variant="decode", refresh_interval=8))
    >>> pipe(["sort:qwertyui|"], gen_length=128, block_length=32, steps=128)
    ['eiqrtuwy']

A diffusion LM reruns the whole sequence at every step, although most positions did not change.
Each step here feeds the model only some positions and serves the keys/values of the others from a
:class:`DKVCache` (a ``transformers`` ``Cache`` whose layers keep every position's post-RoPE K/V in
absolute order). Which positions are fed is decided per step by the variant:

* ``decode`` (dKV-Cache-Decode): a position is served from the cache iff it was a non-mask token
  *with the same id in the previous step's input* (so a token committed at step i-1 is computed as a
  real token at step i, stored, and served from step i+1: the delay); everything else, the masked
  suffix included, is fed. Full forwards rebuild the cache at the first two steps of every block and
  every ``refresh_interval`` steps.
* ``greedy`` (dKV-Cache-Greedy; needs ``remasking="random"``, whose order is fixed per block so
  the next commits are known): a step feeds only the tokens committed at the previous step (the
  delay), the positions it will commit, and up to ``window`` still-masked neighbours of each of
  those (nearest first, left before right); every other position, masked ones included, is served
  stale. Full forwards every ``refresh_interval`` steps of a block (2 in the paper), step 0 included.
* ``prefill``: the prompt's K/V are computed at the first step and never refreshed; every answer
  position is fed at every step.
* ``pd``: the prompt as in ``prefill``, answer tokens by the ``decode`` rule; refreshes recompute
  answer rows only.
* ``prefix`` (Fast-dLLM PrefixCache): a full forward at each block start; then the block and the
  masked suffix are fed against the cached prefix.
* ``dual`` (Fast-dLLM DualCache): a full forward at each block start; then only the current block
  is fed, prefix and suffix served (the suffix stays stale until the next block).

Keys are cached after RoPE with explicit absolute ``position_ids``, so attention is order-invariant
over keys and stock ``LlamaForCausalLM``/``Qwen2ForCausalLM`` (``config.is_causal = False``) need no
edits. A step writes the fed positions' fresh K/V into the storage (row copies) and attends over the
whole storage, keys in absolute order, with a 4-D mask of the valid positions: no gather of the
served rows and no concatenation. Rows of a batch may feed different numbers of positions: the fed
index set is padded to the batch maximum, and padded slots write to a spare row that is never read.
Index sets are built on the device with sorts (no per-row loops; one host sync per step, the width).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from functools import cached_property

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from accel import _compat
from accel.api import register_text_plugin
from accel.config import PluginConfig, check_int
from accel.errors import ConfigError

VARIANTS = ("decode", "greedy", "prefill", "pd", "prefix", "dual")


@dataclass
class DKVCacheConfig(PluginConfig):
    """Args:
        variant: one of ``decode``, ``prefill``, ``pd``, ``prefix``, ``dual`` (see the module doc).
        refresh_interval: R, full forwards every R steps of a block (``decode``/``pd``/``greedy``);
            1 = every step (identical to no cache).
        window: ``greedy`` only: still-masked neighbours fed around each position about to be committed.
        dream_shift: for shifted-logit (Dream-style) models, when row j may be served from the cache
            (the delay applies on top): ``"un"`` once token j+1 is committed (dKV-Cache's default),
            ``"right"`` once token j is, ``"un_right"`` once both are. Rows whose output predicts a
            masked token are always fed.
    """

    variant: str = "decode"
    refresh_interval: int = 8
    window: int = 4
    dream_shift: str = "un"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        check_int("refresh_interval", self.refresh_interval, 1)
        check_int("window", self.window, 0)
        if self.dream_shift not in ("un", "right", "un_right"):
            raise ConfigError(f"dream_shift must be 'un', 'right' or 'un_right', got {self.dream_shift!r}")


@dataclass
class StepPlan:
    """Which positions a step feeds (all tensors on the model's device); every other valid position
    is served from the cache."""

    fed_idx: torch.Tensor  # (B, F) absolute positions fed, padded
    fed_valid: torch.Tensor  # (B, F) bool
    length: int  # sequence length L (the storage has L + 1 slots; slot L takes padded writes)
    refresh: bool

    @cached_property
    def rows(self) -> torch.Tensor:
        """(B * F,) storage rows the fed K/V go to: row ``b * (L + 1) + position`` (slot L when padded)."""
        store = torch.where(self.fed_valid, self.fed_idx, self.length)
        base = torch.arange(store.shape[0], device=store.device)[:, None] * (self.length + 1)
        return (store + base).reshape(-1)


class DKVLayer(CacheLayerMixin):
    """One layer's K/V in absolute position order; ``plan`` says what this forward feeds and serves."""

    def __init__(self):
        super().__init__()
        self.plan: StepPlan | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        shape = (b * (self.plan.length + 1), h, d)  # rows (batch, position): a write is a row copy
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros(shape)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        plan = self.plan
        b, h, f, d = key_states.shape
        if not self.is_initialized or plan.refresh or self.keys.shape[0] != b * (plan.length + 1):
            self.lazy_initialization(key_states, value_states)
        self.keys.index_copy_(0, plan.rows, key_states.transpose(1, 2).reshape(b * f, h, d))
        self.values.index_copy_(0, plan.rows, value_states.transpose(1, 2).reshape(b * f, h, d))
        if plan.refresh:
            return key_states, value_states
        # the fed rows are fresh in the storage now: attend over all of it in absolute order (no
        # gather of the served rows, no concatenation; invalid positions are masked)
        n = plan.length
        return (self.keys.view(b, n + 1, h, d)[:, :n].transpose(1, 2),
                self.values.view(b, n + 1, h, d)[:, :n].transpose(1, 2))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.plan is None or self.plan.refresh:
            return query_length, 0
        return self.plan.length, 0

    def get_seq_length(self) -> int:
        return 0  # positions are always passed explicitly

    def get_max_length(self) -> int:
        return -1


class DKVCache(Cache):
    """A ``transformers`` cache of :class:`DKVLayer`; :meth:`set_plan` before each forward."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[DKVLayer() for _ in range(num_layers)])

    def set_plan(self, plan: StepPlan) -> None:
        for layer in self.layers:
            layer.plan = plan


def _pack(select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool -> (B, K) positions of the True entries first, padded, and their validity."""
    count = select.sum(1)
    width = int(count.max()) if select.numel() else 0  # one host sync per step
    order = (~select).to(torch.int8).argsort(dim=1, stable=True)[:, :max(width, 1)]
    valid = torch.arange(order.shape[1], device=select.device)[None, :] < count[:, None]
    return order, valid


def _cache_keyword(model) -> str:
    """The keyword ``model.forward`` takes its cache by: ``cache`` since transformers 5.23 (which warns
    on ``past_key_values``), ``past_key_values`` before, and in remote-code models such as LLaDA2's."""
    return _cache_keyword_of(type(model))


@functools.cache
def _cache_keyword_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def forward_subset(model, cache: DKVCache, x, attention, positions, fed, refresh: bool, call=None) -> torch.Tensor:
    """Run ``model`` (or ``call``, its unhooked forward) on the ``fed`` positions of ``x`` (B, L), serving
    the other valid positions from ``cache`` (or rebuilding it when ``refresh``); returns (B, L, V)
    logits, zero where not fed."""
    fed_idx, fed_valid = _pack(fed)
    key_valid = fed_valid if refresh else attention.bool()  # keys: the fed rows, or the whole storage
    cache.set_plan(StepPlan(fed_idx, fed_valid, x.shape[1], refresh))
    q = fed_idx.shape[1]
    mask = key_valid[:, None, None, :].expand(-1, 1, q, -1)
    if model.config._attn_implementation == "eager":
        neg = torch.finfo(model.dtype).min
        mask = torch.zeros(mask.shape, dtype=model.dtype, device=x.device).masked_fill(~mask, neg)
    out = (call or model)(input_ids=x.gather(1, fed_idx), position_ids=positions.gather(1, fed_idx),
                          attention_mask=mask, use_cache=True, **{_cache_keyword(model): cache}).logits
    width = x.shape[1]
    logits = out.new_zeros(x.shape[0], width + 1, out.shape[-1])  # padded slots land in column L
    logits.scatter_(1, torch.where(fed_valid, fed_idx, width)[..., None].expand(-1, -1, out.shape[-1]), out)
    return logits[:, :width]


class DKVController:
    """Per-generation state and the model call for one variant. Use it as the pipeline's ``forward``."""

    def __init__(self, model, config: DKVCacheConfig, mask_id: int):
        self.model, self.config, self.mask_id = model, config, mask_id
        self.cache = DKVCache(model.config.num_hidden_layers)
        self.pipe = None  # the pipeline, for the plan hints greedy needs
        self.shift = False  # set per generation by a shifted-logit (Dream-style) pipeline
        self.reset()

    def reset(self) -> None:
        self.prev: torch.Tensor | None = None
        self.block = -1
        self.step_in_block = 0
        self.fed_tokens = 0
        self.total_tokens = 0
        self.fed_counts: list[list[int]] = []

    def _fed(self, x: torch.Tensor, attention: torch.Tensor, prompt_len: int, block_start: int, block_end: int,
             ) -> tuple[torch.Tensor, bool]:
        """(B, L) bool of positions to feed, and whether this is a full (refresh) forward."""
        valid = attention.bool()
        v, i = self.config.variant, self.step_in_block
        answer = torch.zeros_like(valid)
        answer[:, prompt_len:] = True
        if v in ("prefix", "dual"):
            if i == 0:
                return valid, True
            lo = torch.zeros_like(valid)
            lo[:, block_start:] = True
            if v == "dual":
                lo[:, block_end:] = False
            return lo & valid, False
        if v == "prefill":
            if self.prev is None:
                return valid, True
            return answer & valid, False
        if v == "greedy":
            return self._greedy(x, valid)
        refresh = i < 2 or i % self.config.refresh_interval == 0 or self.prev is None
        if v == "pd" and self.prev is not None and refresh:
            return answer & valid, False  # refresh the answer rows; the prompt stays cached
        if refresh:
            return valid, True
        same = (x == self.prev) & (self.prev != self.mask_id)
        if self.shift:  # Dream: row j predicts token j+1
            nxt = torch.cat([same[:, 1:], torch.ones_like(same[:, :1])], 1)
            same = {"un": nxt, "right": same, "un_right": same & nxt}[self.config.dream_shift]
            predicts_mask = torch.cat([x[:, 1:] == self.mask_id, torch.zeros_like(same[:, :1])], 1)
            same = same & ~predicts_mask
        if v == "pd":
            same = same | ~answer
        return valid & ~same, False

    def _greedy(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, bool]:
        hint = getattr(self.pipe, "plan_hint", None) if self.pipe is not None else None
        if hint is None or hint.get("priority") is None:
            raise ConfigError("dKV-Cache-Greedy needs remasking='random' with a fixed step quota (no threshold)")
        i = self.step_in_block
        if self.prev is None or i % self.config.refresh_interval == 0:
            return valid, True
        masked = (x == self.mask_id) & hint["in_block"][None, :]
        just_committed = (self.prev == self.mask_id) & (x != self.mask_id)  # the delay
        n = hint["quotas"][:, i]
        score = hint["priority"].masked_fill(~masked, -1.0)
        rank = score.argsort(-1, descending=True).argsort(-1)
        upcoming = (rank < n[:, None]) & masked  # what this step commits
        near = torch.zeros_like(upcoming)
        closeness = torch.zeros(x.shape, device=x.device)  # larger = nearer (left before right)
        still = (x == self.mask_id) & ~upcoming
        k = 0
        for d in range(1, self.config.window + 1):
            for shift in (d, -d):  # position p is a neighbour when upcoming[p + shift]
                moved = torch.roll(upcoming, shifts=-shift, dims=1)
                if shift > 0:
                    moved[:, -shift:] = False
                else:
                    moved[:, :-shift] = False
                new = moved & still & ~near
                closeness = torch.where(new, float(2 * self.config.window - k), closeness)
                near |= new
                k += 1
        if self.config.window:  # at most `window` neighbours per upcoming position, nearest first
            order = closeness.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
            near &= order < (n * self.config.window)[:, None]
        return valid & (just_committed | upcoming | near), False

    def __call__(self, x, attention, positions, step: int, block: int, prompt_len: int, block_start: int,
                 block_end: int):
        if block != self.block:
            self.block, self.step_in_block = block, 0
        fed, refresh = self._fed(x, attention, prompt_len, block_start, block_end)
        logits = forward_subset(self.model, self.cache, x, attention, positions, fed, refresh)
        self.prev = x.clone()
        self.step_in_block += 1
        self.fed_tokens = self.fed_tokens + fed.sum()  # tensors: no host sync
        self.total_tokens = self.total_tokens + attention.bool().sum()
        self.fed_counts.append(fed.sum(1))
        return logits, fed

    @property
    def computed_fraction(self) -> float:
        """Fraction of (step, position) pairs the model computed in this generation."""
        return float(self.fed_tokens) / max(float(self.total_tokens), 1.0)


class DKVHandle:
    """What ``accel.apply`` installs on a :class:`pipelines.diffusion_lm.DiffusionLMPipeline`."""

    def __init__(self, pipe, config: DKVCacheConfig):
        self.pipe = pipe
        self.controller = DKVController(pipe.model, config, pipe.tokenizer.mask_token_id)
        self.controller.pipe = pipe
        pipe.cache_controller = self.controller

    def remove(self) -> None:
        if getattr(self.pipe, "cache_controller", None) is self.controller:
            self.pipe.cache_controller = None

    def stats(self) -> dict:
        c = self.controller
        return {"tokens_computed": int(c.fed_tokens), "tokens_total": int(c.total_tokens)}


WINDOW_HOOK = "accel_dkv_window"


class _LLaDA2Hook(_compat.ModelHook):
    """On diffusers' ``LLaDA2Pipeline`` model: each call re-runs ``x[:, :window_end]``. Positions that
    were the same non-mask token in the previous call are served from the cache (the ``decode``
    rule); the current block is always fed (LLaDA2's editing reads its committed tokens' logits);
    a window that grew (a new block) or every ``refresh_interval`` calls rebuilds the cache."""

    def __init__(self, model, config: DKVCacheConfig, mask_id: int):
        super().__init__()
        self.config, self.mask_id = config, mask_id
        self.cache = DKVCache(model.config.num_hidden_layers)
        self.prev: torch.Tensor | None = None
        self.calls = 0
        self.block = 0
        self.fed_tokens = self.total_tokens = 0

    def new_forward(self, module, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        x = input_ids
        width = x.shape[1]
        attention = torch.ones_like(x) if attention_mask is None else attention_mask
        positions = position_ids if position_ids is not None else (attention.cumsum(-1) - 1).clamp_min(0)
        if self.prev is None or self.prev.shape != x.shape:
            self.block = width - (0 if self.prev is None or self.prev.shape[0] != x.shape[0] else self.prev.shape[1])
            self.calls = 0
        refresh = self.calls < 2 or self.calls % self.config.refresh_interval == 0
        valid = attention.bool()
        if refresh:
            fed = valid
        else:
            fed = valid & ~((x == self.prev) & (self.prev != self.mask_id))
            fed[:, width - self.block:] = valid[:, width - self.block:]
        logits = forward_subset(module, self.cache, x, attention, positions, fed, refresh,
                                call=self.fn_ref.original_forward)
        self.prev = x.clone()
        self.calls += 1
        self.fed_tokens = self.fed_tokens + fed.sum()
        self.total_tokens = self.total_tokens + valid.sum()
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(logits=logits)

    def reset_state(self, module):
        self.prev, self.calls = None, 0
        return module


class _LLaDA2Handle:
    def __init__(self, pipe, config: DKVCacheConfig):
        self.model = pipe.model
        self.created = not _compat.has_hook_registry(self.model)
        mask_id = getattr(pipe.tokenizer, "mask_token_id", None) if pipe.tokenizer is not None else None
        mask_id = mask_id if mask_id is not None else getattr(self.model.config, "mask_token_id", None)
        if mask_id is None:
            raise ConfigError("cannot find the mask token id (tokenizer.mask_token_id or model.config.mask_token_id)")
        self.hook = _LLaDA2Hook(self.model, config, mask_id)
        _compat.registry_of(self.model).register_hook(self.hook, WINDOW_HOOK)

    def remove(self) -> None:
        _compat.remove_hook(self.model, WINDOW_HOOK)
        _compat.drop_empty_registries(self.model, {id(self.model)} if self.created else set())

    def stats(self) -> dict:
        return {"tokens_computed": int(self.hook.fed_tokens), "tokens_total": int(self.hook.total_tokens)}


@register_text_plugin(DKVCacheConfig)
def _install(pipe, config: DKVCacheConfig):
    if type(pipe).__name__ == "LLaDA2Pipeline":
        if config.variant != "decode":
            raise ConfigError(f"LLaDA2Pipeline supports variant='decode' only, got {config.variant!r}")
        return _LLaDA2Handle(pipe, config)
    if getattr(pipe, "cache_controller", None) is not None:
        raise ConfigError("this diffusion LM pipeline already has a KV cache applied; accel.remove it first")
    return DKVHandle(pipe, config)
