"""Generation for masked diffusion language models (LLaDA- and Dream-style, bidirectional attention).

    >>> from pipelines.zoo import load_reference
    >>> pipe = load_reference("dlm-tasks")                      # DiffusionLMPipeline
    >>> pipe(["reverse:abcdefgh|"], gen_length=128, block_length=32, steps=128)
    ['hgfedcba']

The answer is ``gen_length`` mask tokens after the prompt. LLaDA's semi-autoregressive loop splits
them into blocks of ``block_length`` and the ``steps`` evenly over the blocks; each step runs the
model on the whole sequence, predicts every masked position, and commits the quota of this step
(the block's masked count spread over its steps, remainder first) at the most confident positions
(``remasking="low_confidence"``) or at random ones (``"random"``). ``threshold=tau`` switches to
parallel decoding: every masked position of the block whose confidence reaches tau is committed,
and at least the most confident one, until the block is full (the step count then adapts).
``shift_logits=True`` reads position j's prediction from row j-1 (Dream-style models).

Prompts of different lengths are left-padded with correct position ids and a padding mask; rows
are handled together on the device (one sort per step, no per-row Python loops). Generation stops
early once every row has an EOS committed with nothing masked before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from accel.errors import ConfigError


def _quotas(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) commit counts: ``masked`` (B,) spread evenly, the remainder on the earliest steps."""
    base = masked // steps
    rem = masked % steps
    ar = torch.arange(steps, device=masked.device)
    return base[:, None] + (ar[None, :] < rem[:, None]).long()


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs > p
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class DiffusionLMPipeline:
    """Masked-diffusion text generation with any ``transformers`` model whose attention is
    bidirectional (``config.is_causal = False``) and a tokenizer with a mask token.

    Args:
        model: e.g. ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` with ``config.is_causal=False``.
        tokenizer: a ``PreTrainedTokenizerFast`` with ``mask_token``, ``eos_token`` and ``pad_token``.
        shift_logits: Dream-style models predict position j from row j-1.
    """

    def __init__(self, model, tokenizer, shift_logits: bool = False):
        if getattr(model.config, "is_causal", True):
            raise ConfigError(f"{type(model).__name__} has causal attention (config.is_causal is not False); a "
                              "masked diffusion LM needs bidirectional attention")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name, None) is None:
                raise ConfigError(f"the tokenizer has no {name[:-3]} (set tokenizer.{name[:-9]}_token)")
        self.model, self.tokenizer, self.shift_logits = model, tokenizer, shift_logits
        self.progress = True
        self.cache_controller = None  # set by accel.apply(pipe, DKVCacheConfig(...))

    accel_text_target = True  # accel.apply takes diffusion-LM configs (dKV-Cache) for this pipeline

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress = not disable

    # -- inputs ------------------------------------------------------------------------------
    def encode(self, prompts: list[str] | str, chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and attention mask (1 = real token) for the prompts."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or any(not p for p in prompts):
            raise ConfigError("every prompt must be a non-empty string")
        if chat:
            prompts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                          add_generation_prompt=True) for p in prompts]
        rows = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return ids, mask

    # -- one forward ---------------------------------------------------------------------------
    def logits(self, x: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Model rows (unshifted); :meth:`__call__` applies the Dream shift."""
        return self.model(input_ids=x, attention_mask=attention, position_ids=positions).logits

    @staticmethod
    def _shift(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:, :1], t[:, :-1]], dim=1)

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompts, gen_length: int = 128, block_length: int = 32, steps: int | None = None, *,
                 temperature: float = 0.0, top_p: float | None = None, remasking: str = "low_confidence",
                 threshold: float | None = None, chat: bool = False, stop_at_eos: bool = True,
                 generator: torch.Generator | None = None, stream: Callable | None = None,
                 forward: Callable | None = None, return_ids: bool = False):
        """Generate; returns the decoded answers (text up to the first EOS), or the ids with
        ``return_ids=True``. ``stream(step, row, position, token_id)`` is called for every
        committed token; ``forward(x, attention, positions, step, block, prompt_len, block_start,
        block_end)`` replaces the model call and returns logits, or (logits, positions computed);
        a cache applied with ``accel.apply`` supplies it."""
        steps = gen_length if steps is None else steps
        if gen_length < 1 or block_length < 1 or gen_length % block_length:
            raise ConfigError(f"gen_length ({gen_length}) must be a positive multiple of block_length ({block_length})")
        blocks = gen_length // block_length
        if threshold is None and (steps < blocks or steps % blocks):
            raise ConfigError(f"steps ({steps}) must be a positive multiple of the number of blocks ({blocks})")
        if remasking not in ("low_confidence", "random"):
            raise ConfigError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")
        prompt, prompt_mask = self.encode(prompts, chat)
        B, P = prompt.shape
        mask_id, eos = self.tokenizer.mask_token_id, self.tokenizer.eos_token_id
        dev = self.device
        x = torch.cat([prompt, torch.full((B, gen_length), mask_id, device=dev)], 1)
        attention = torch.cat([prompt_mask, torch.ones(B, gen_length, dtype=prompt_mask.dtype, device=dev)], 1)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        controller = self.cache_controller if forward is None else None
        if controller is not None:
            controller.reset()
            controller.shift = self.shift_logits
            forward = controller
        call = forward or (lambda x_, a_, p_, s_, b_, *_: self.logits(x_, a_, p_))
        per_block = steps // blocks if threshold is None else None
        from tqdm.auto import tqdm

        bar = tqdm(total=gen_length, desc="diffusion LM", disable=not self.progress, leave=False)
        self.nfe = 0
        step = 0
        for b in range(blocks):
            lo, hi = P + b * block_length, P + (b + 1) * block_length
            in_block = torch.zeros(x.shape[1], dtype=torch.bool, device=dev)
            in_block[lo:hi] = True
            quotas = None if per_block is None else _quotas((x[:, lo:hi] == mask_id).sum(1), per_block)
            # random remasking: one random order per block (the same distribution as fresh draws each
            # step, and it lets a cache know which positions the next step commits)
            priority = (torch.rand(x.shape, generator=generator, device="cpu").to(dev)
                        if remasking == "random" and threshold is None else None)
            i = 0
            while True:
                masked = (x == mask_id) & in_block
                if not bool(masked.any()):  # the one host sync per step
                    break
                if per_block is not None and i >= per_block:
                    break
                self.plan_hint = {"priority": priority, "quotas": quotas, "step_in_block": i, "in_block": in_block}
                result = call(x, attention, positions, step, b, P, lo, hi)
                logits, fed = result if isinstance(result, tuple) else (result, None)
                if self.shift_logits:  # position j reads row j-1
                    logits = self._shift(logits)
                    fed = None if fed is None else self._shift(fed)
                logits = logits.float()
                logits[..., mask_id] = -math.inf  # never "commit" the mask token itself
                self.nfe += 1
                if top_p is not None:
                    logits = _top_p(logits, top_p)
                if temperature > 0:
                    g = -torch.log(-torch.log(torch.rand(logits.shape, generator=generator, dtype=torch.float64,
                                                         device="cpu").clamp_min(1e-20))).to(dev)
                    pred = (logits.double() / temperature + g).argmax(-1)
                else:
                    pred = logits.argmax(-1)
                if priority is not None:
                    conf = priority.clone()
                else:
                    conf = logits.softmax(-1).gather(-1, pred[..., None])[..., 0]
                conf = conf.masked_fill(~masked if fed is None else ~(masked & fed), -math.inf)
                if threshold is None:
                    n = quotas[:, i]
                    rank = conf.argsort(-1, descending=True).argsort(-1)
                    commit = (rank < n[:, None]) & masked
                else:
                    best = conf.argmax(-1, keepdim=True)
                    commit = ((conf >= threshold) & masked).scatter(1, best, masked.gather(1, best))
                x = torch.where(commit, pred, x)
                if stream is not None:
                    for row, pos in commit.nonzero().tolist():
                        stream(step, row, pos - P, int(x[row, pos]))
                if self.progress:  # counting syncs with the device: only when a bar is shown
                    bar.update(int(commit.sum()) // max(B, 1))
                i += 1
                step += 1
            if stop_at_eos and b + 1 < blocks:
                # a row is finished once an EOS is committed and nothing before it is still masked
                ans = x[:, P:]
                is_eos = ans == eos
                first = torch.where(is_eos.any(1), is_eos.float().argmax(1), gen_length)
                before = torch.arange(gen_length, device=dev)[None, :] < first[:, None]
                finished = (first < gen_length) & ~((ans == mask_id) & before).any(1)
                if bool(finished.all()):
                    x[:, hi:] = torch.where(x[:, hi:] == mask_id, eos, x[:, hi:])
                    break
        bar.close()
        answer = x[:, P:]
        if return_ids:
            return answer
        return [self.decode(row) for row in answer]

    def decode(self, ids: torch.Tensor) -> str:
        ids = ids.tolist()
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[: ids.index(eos)]
        mask_id = self.tokenizer.mask_token_id
        return self.tokenizer.decode([i for i in ids if i != mask_id], skip_special_tokens=False)
