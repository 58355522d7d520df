"""``dlm-tasks``: a small bidirectional Llama masked-diffusion LM on synthetic tasks with exact answers.

    >>> from pipelines.zoo.dlm import sample_tasks, exact_match
    >>> task = sample_tasks("heldout", 1)[0]
    >>> task.prompt, task.answer            # e.g. ('reverse:kqzmbwta|', 'atwbmzqk')
    >>> exact_match([task.answer], [task])
    1.0

Tasks (prompt ``"<task>:<input>|"``, answer then EOS padding up to the generation length):
``copy`` and ``reverse`` of 8-12 lowercase letters, ``sort`` of 8-12 letters, and ``add``
(two numbers below 1000 written with three digits, the answer restating them with a four-digit
sum, ``"082+377=0459"``: fixed widths put every digit at a fixed offset from the digits it depends
on; with free widths the model had learned no addition at all after 20000 steps), so every answer
has 8-12 tokens. The tokenizer is character-level (``tokenizers`` WordLevel over single characters,
with ``<pad>``, ``<mask>``, ``<eos>``, ``<bos>`` and a chat template), saved in the standard format.

Training is LLaDA's supervised recipe: the prompt is kept, each answer token (EOS padding
included) is masked with probability t ~ U(0, 1], and the loss is the cross-entropy on masked
positions divided by t, averaged per answer token; batches are EOS-padded to a length drawn from
``train_lengths`` so padding does not swamp the content. Splits come from disjoint seed streams.
"""

from __future__ import annotations

import json
import math
import os
import random
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

TASKS = ("copy", "reverse", "sort", "add")
SPLIT_SEEDS = {"train": 1_000_003, "calibration": 2_000_003, "heldout": 3_000_017}
SPECIALS = ["<pad>", "<mask>", "<eos>", "<bos>", "<unk>"]
CHARS = string.ascii_lowercase + string.digits + ":|+=\n"
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{% endif %}")


@dataclass(frozen=True)
class Task:
    kind: str
    text: str
    prompt: str
    answer: str


def _make(kind: str, rng: random.Random) -> Task:
    if kind == "add":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        text = f"{a:03d}+{b:03d}"
        return Task(kind, text, f"add:{text}|", f"{text}={a + b:04d}")
    text = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(8, 12)))
    answer = {"copy": text, "reverse": text[::-1], "sort": "".join(sorted(text))}[kind]
    return Task(kind, text, f"{kind}:{text}|", answer)


def sample_tasks(split: str, n: int, start: int = 0) -> list[Task]:
    """Tasks ``start .. start+n-1`` of a split; task i cycles through the kinds. Training never
    contains a held-out or calibration input."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}")
    reserved = set() if split != "train" else {t.text for s in ("heldout", "calibration")
                                               for t in sample_tasks(s, 512)}
    out, i = [], start
    while len(out) < n:
        task = _make(TASKS[i % len(TASKS)], random.Random(SPLIT_SEEDS[split] * 7_919 + i))
        i += 1
        if task.text not in reserved:
            out.append(task)
    return out


def exact_match(answers: list[str], tasks: list[Task]) -> float:
    return sum(a == t.answer for a, t in zip(answers, tasks)) / max(len(tasks), 1)


def per_task(answers: list[str], tasks: list[Task]) -> dict[str, float]:
    out = {}
    for kind in TASKS:
        pairs = [(a, t) for a, t in zip(answers, tasks) if t.kind == kind]
        if pairs:
            out[kind] = sum(a == t.answer for a, t in pairs) / len(pairs)
    return out


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("<[a-z]+>|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", mask_token="<mask>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>", model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass
class DLMRecipe:
    hidden: int = 160
    layers: int = 4
    heads: int = 4
    intermediate: int = 480
    gen_length: int = 128
    # answer lengths the batches are padded to (drawn per step): with only 128, ~92% of the loss is
    # EOS padding and content is learned slowly (measured: 0% exact match after 4000 steps)
    train_lengths: tuple[int, ...] = (32, 32, 64, 128)
    batch: int = 32
    steps: int = 40000
    lr: float = 1e-3
    warmup: int = 300
    seed: int = 0
    checkpoint_every: int = 500
    eval_every: int = 2000
    train_tasks: int = 200_000
    # stage 2: long contexts. After ``steps``, ``few_shot_steps`` more steps in which a share
    # ``few_shot_rate`` of the batches put 1..``max_shots`` solved training tasks in front of each
    # prompt (up to ~300 prompt tokens, the setting where KV caching pays), at ``few_shot_lr`` decaying
    # to 5% of it. Without it the model never sees positions past ~150 and fails on long prompts.
    few_shot_steps: int = 2500
    few_shot_rate: float = 0.5
    max_shots: int = 10
    few_shot_lr: float = 2e-4
    # stage 3: a second long-context pass, the same batches as stage 2, from a fresh optimizer state
    # at ``refine_lr`` decaying to 5% of it. After stage 2 the model solved 94% of short tasks but
    # only 70% of 10-shot ones (sort 31%: letters taken from the shots).
    refine_steps: int = 3000
    refine_lr: float = 3e-4

    @property
    def refine_start(self) -> int:
        return self.steps + self.few_shot_steps

    @property
    def total_steps(self) -> int:
        return self.refine_start + self.refine_steps


def build_model(recipe: DLMRecipe, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
                      num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                      num_key_value_heads=recipe.heads, max_position_embeddings=256, tie_word_embeddings=True,
                      pad_token_id=0, bos_token_id=3, eos_token_id=2)
    cfg.is_causal = False
    cfg.mask_token_id = 1
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(cfg)


def batch_of(tasks: list[Task], tokenizer, gen_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, answer mask, attention) with prompts left-padded and answers EOS-padded to gen_length."""
    prompts = [tokenizer(t.prompt, add_special_tokens=False)["input_ids"] for t in tasks]
    answers = [tokenizer(t.answer, add_special_tokens=False)["input_ids"] for t in tasks]
    width = max(len(p) for p in prompts)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids, attn = [], []
    for p, a in zip(prompts, answers):
        ids.append([pad] * (width - len(p)) + p + a + [eos] * (gen_length - len(a)))
        attn.append([0] * (width - len(p)) + [1] * (len(p) + gen_length))
    ids, attn = torch.tensor(ids), torch.tensor(attn)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, width:] = True
    return ids, answer, attn


def masked_diffusion_loss(model, ids, answer, attn, mask_id: int, generator: torch.Generator):
    b = ids.shape[0]
    # drawn on the CPU generator, so every device sees the same masks
    t = torch.rand(b, 1, generator=generator).clamp_min(1e-3).to(ids.device)
    masked = (torch.rand(ids.shape, generator=generator).to(ids.device) < t) & answer
    x = torch.where(masked, mask_id, ids)
    positions = (attn.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=x, attention_mask=attn, position_ids=positions).logits.float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    return ((ce * masked) / t).sum() / answer.sum()


def few_shot(prompt: str, shots: list[Task]) -> str:
    """``prompt`` with solved tasks in front, one per line (the long-context format)."""
    return "".join(f"{t.prompt}{t.answer}\n" for t in shots) + prompt


def _with_shots(tasks: list[Task], pool: list[Task], recipe: DLMRecipe, gen: torch.Generator) -> list[Task]:
    out = []
    for t in tasks:
        k = int(torch.randint(1, recipe.max_shots + 1, (1,), generator=gen))
        shots = [pool[i] for i in torch.randint(len(pool), (k,), generator=gen).tolist()]
        out.append(Task(t.kind, t.text, few_shot(t.prompt, shots), t.answer))
    return out


def _cosine(base: float, frac: float) -> float:
    """Cosine decay from ``base`` to 5% of it over ``frac`` in [0, 1]."""
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _lr(step: int, recipe: DLMRecipe) -> float:
    if step >= recipe.refine_start:  # stage 3 (long contexts again)
        return _cosine(recipe.refine_lr, (step - recipe.refine_start) / max(1, recipe.refine_steps))
    if step >= recipe.steps:       # stage 2 (long contexts)
        return _cosine(recipe.few_shot_lr, (step - recipe.steps) / max(1, recipe.few_shot_steps))
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    return _cosine(recipe.lr, (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup))


def evaluate(pipe, n: int = 200, batch: int = 32, progress: bool = False, **call) -> dict:
    """Exact match on the first ``n`` held-out tasks (greedy, one token per step by default)."""
    tasks = sample_tasks("heldout", n)
    call = {"gen_length": 128, "block_length": 32, "steps": 128, **call}
    answers = []
    for i in range(0, n, batch):
        answers += pipe([t.prompt for t in tasks[i:i + batch]], **call)
    return {"exact_match": exact_match(answers, tasks), "per_task": per_task(answers, tasks), "n": n,
            "call": call, "answers": answers}


def save_pipeline(model, tokenizer, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def load_pipeline(path: str | os.PathLike, device: str = "cpu", dtype=torch.float32):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from pipelines.diffusion_lm import DiffusionLMPipeline

    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=dtype, use_safetensors=True).to(device).eval()
    model.config.is_causal = False
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return DiffusionLMPipeline(model, tokenizer)


def _atomic_save(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def train(work_dir: str | os.PathLike, recipe: DLMRecipe | None = None, out: str | os.PathLike | None = None,
          progress: bool = True, threads: int | None = None, stop_at: int | None = None,
          device=None) -> Path | None:
    """Train (or resume) ``dlm-tasks`` in ``work_dir``; writes the pipeline to ``out`` when done.

    ``device`` defaults to CUDA when available; checkpoints and the written pipeline are CPU tensors.
    """
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from pipelines.diffusion_lm import DiffusionLMPipeline

    recipe = recipe or DLMRecipe()
    if threads:
        torch.set_num_threads(threads)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(recipe, len(tokenizer)).to(device)    # before the optimizer: its state follows the params
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
    ckpt, meta_file = work / "model.safetensors", work / "meta.json"
    step = 0
    if ckpt.exists() and meta_file.exists():
        model.load_state_dict(load_file(str(ckpt)), strict=False)
        model.tie_weights()
        opt_file = work / "optim.pt"
        if opt_file.exists():
            opt.load_state_dict(torch.load(opt_file, weights_only=True, map_location=device))
        step = json.loads(meta_file.read_text())["step"]
    train_tasks = sample_tasks("train", recipe.train_tasks) if step < recipe.total_steps else []
    log = open(work / "log.jsonl", "a")  # noqa: SIM115
    bar = tqdm(total=recipe.total_steps, initial=step, desc="dlm-tasks", disable=not progress)
    model.train()
    t0 = time.time()
    try:
        while step < recipe.total_steps:
            gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
            idx = torch.randint(len(train_tasks), (recipe.batch,), generator=gen).tolist()
            lengths = recipe.train_lengths or (recipe.gen_length,)
            length = lengths[int(torch.randint(len(lengths), (1,), generator=gen))]
            tasks = [train_tasks[i] for i in idx]
            if step >= recipe.steps and float(torch.rand(1, generator=gen)) < recipe.few_shot_rate:
                tasks = _with_shots(tasks, train_tasks, recipe, gen)
            ids, answer, attn = (x.to(device) for x in batch_of(tasks, tokenizer, length))
            if step == recipe.refine_start and recipe.refine_steps:
                opt.state.clear()  # stage 3 starts from fresh moments
            for group in opt.param_groups:
                group["lr"] = _lr(step, recipe)
            loss = masked_diffusion_loss(model, ids, answer, attn, tokenizer.mask_token_id, gen)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % recipe.checkpoint_every == 0 or step == recipe.total_steps:
                _atomic_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                              if k != "lm_head.weight"}, ckpt)  # tied to the embeddings
                tmp = work / "optim.pt.tmp"
                torch.save(opt.state_dict(), tmp)
                os.replace(tmp, work / "optim.pt")
                meta_file.write_text(json.dumps({"step": step, "recipe": asdict(recipe)}))
                record = {"step": step, "loss": float(loss.detach()), "seconds": time.time() - t0}
                if step % recipe.eval_every == 0 or step == recipe.total_steps:
                    model.eval()
                    pipe = DiffusionLMPipeline(model, tokenizer)
                    pipe.set_progress_bar_config(disable=True)
                    report = evaluate(pipe, n=64)
                    record.update(exact_match=report["exact_match"], per_task=report["per_task"])
                    model.train()
                log.write(json.dumps(record) + "\n")
                log.flush()
                if stop_at is not None and step >= stop_at:
                    return None
    finally:
        bar.close()
        log.close()
    model.to("cpu").eval()
    return save_pipeline(model, tokenizer, out or work / "pipeline")


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="train the dlm-tasks reference model (resumable)")
    ap.add_argument("--work-dir", default="runs/dlm-tasks")
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--stop-at", type=int)
    ap.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    args = ap.parse_args(argv)
    recipe = DLMRecipe(steps=args.steps) if args.steps else DLMRecipe()
    out = train(args.work_dir, recipe, args.out, threads=args.threads or None, stop_at=args.stop_at,
                device=args.device)
    print(f"pipeline written to {out}" if out else "stopped at a checkpoint; rerun to resume")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
