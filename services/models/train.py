"""Training loop pieces: packed causal-LM pre-training, greedy teacher data, distillation.

Contracts:

* Every function is deterministic for its ``seed`` on a given machine and thread
  count: batches come from a seeded ``torch.Generator``, never from global RNG state.
* Models are float32. Where the CPU computes bfloat16 natively (AVX512-BF16 or
  AMX, see :func:`native_bf16`), the matmuls run under CPU bfloat16 autocast while
  training (1.7x faster on a 2-core AVX512-BF16 machine); elsewhere bf16 is emulated
  (about 28x slower than float32 on an AVX2-only EPYC: 17 s against 0.6 s a step),
  so training stays in float32. ``TrainConfig(bf16=True/False)`` overrides the
  choice. The optimiser keeps float32 weights; inference helpers run in float32.
* Models are left in eval mode when a function returns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings for one training run (AdamW + linear warm-up + cosine decay)."""

    steps: int
    batch_size: int = 16
    block_size: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    #: bfloat16 autocast for the matmuls: None decides by the CPU (:func:`native_bf16`).
    bf16: bool | None = None

    @property
    def use_bf16(self) -> bool:
        return native_bf16() if self.bf16 is None else self.bf16


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic in hardware (AVX512-BF16 or AMX).

    Asks torch's own CPU feature probes (``torch.cpu._is_avx512_bf16_supported``,
    ``_is_amx_tile_supported``), and only while torch's kernels run at AVX512
    level (``torch.backends.cpu.get_cpu_capability()``: a machine, or an
    ``ATEN_CPU_CAPABILITY=avx2`` setting, at AVX2 gets False). A torch without
    the probes answers False, which is always safe (float32 training, at most
    1.7x slower).
    """
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False  # the kernels in use are AVX2 or older (the CPU, or ATEN_CPU_CAPABILITY, says so)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return False


def token_stream(sequences: Sequence[Sequence[int]], eos_id: int) -> torch.Tensor:
    """All sequences concatenated into one 1-D tensor, each followed by ``eos_id``.

    The eos separator is what a model sees between documents, so it learns to end a
    text with eos and to start afresh after one.
    """
    total = sum(len(s) + 1 for s in sequences)
    out = torch.empty(total, dtype=torch.long)
    i = 0
    for s in sequences:
        out[i : i + len(s)] = torch.as_tensor(s, dtype=torch.long)
        out[i + len(s)] = eos_id
        i += len(s) + 1
    return out


def pack_blocks(stream: torch.Tensor, block_size: int, offset: int = 0) -> torch.Tensor:
    """``[n, block_size]`` consecutive blocks of ``stream`` starting at ``offset`` (tail dropped)."""
    n = (len(stream) - offset) // block_size
    return stream[offset : offset + n * block_size].view(n, block_size)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up, cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights are not decayed)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
    )


def block_batches(stream: torch.Tensor, cfg: TrainConfig, seed: int) -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, block_size]`` batches of ``stream``.

    Each pass over the data starts at a fresh random offset and visits the blocks in
    a fresh random order, so repeated epochs see differently cut blocks.
    """
    gen = torch.Generator().manual_seed(seed)
    while True:
        offset = int(torch.randint(0, cfg.block_size, (1,), generator=gen))
        blocks = pack_blocks(stream, cfg.block_size, offset)
        order = torch.randperm(len(blocks), generator=gen)
        for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            yield blocks[order[i : i + cfg.batch_size]]


def _optimise(
    model: torch.nn.Module,
    cfg: TrainConfig,
    loss_fn: Callable[[int], torch.Tensor],
    progress: bool,
    desc: str,
) -> dict:
    """The shared loop: ``loss_fn(step)`` gives a scalar loss to minimise at each step."""
    model.train()
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
    )
    start = time.perf_counter()
    smooth = None
    losses = []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    bf16 = cfg.use_bf16
    for step in bar:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        value = float(loss.detach())
        losses.append(value)
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        bar.set_postfix(loss=f"{smooth:.3f}", refresh=False)
    bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": cfg.steps,
        "final_loss": sum(tail) / len(tail),
        "seconds": time.perf_counter() - start,
        "bf16_autocast": bf16,
    }


def train_causal_lm(
    model: torch.nn.Module,
    stream: torch.Tensor,
    cfg: TrainConfig,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> dict:
    """Next-token cross-entropy training on packed blocks of ``stream``.

    Returns ``{"steps", "final_loss", "seconds", "tokens"}`` (``final_loss``: mean of
    the last tenth of the steps).
    """
    batches = block_batches(stream, cfg, seed)

    def loss_fn(step: int) -> torch.Tensor:
        x = next(batches)
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())

    stats = _optimise(model, cfg, loss_fn, progress, desc)
    stats["tokens"] = cfg.steps * cfg.batch_size * cfg.block_size
    return stats


@torch.inference_mode()
def evaluate_loss(model: torch.nn.Module, stream: torch.Tensor, block_size: int, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over packed blocks of ``stream``."""
    model.eval()
    blocks = pack_blocks(stream, block_size)
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i : i + batch_size]
        logits = model(input_ids=x).logits[:, :-1]
        total += float(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        count += x[:, 1:].numel()
    return total / max(1, count)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with the prompts left-padded to the longest one."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids, mask


@torch.inference_mode()
def greedy_continuations(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    pad_id: int,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "generate",
) -> list[list[int]]:
    """The model's greedy continuation (exactly ``new_tokens`` tokens) of each prompt.

    Runs HF ``generate`` on left-padded batches. Generation does not stop at eos: the
    continuation is what the model would predict token after token, eos included,
    which is what a speculative draft has to agree with.
    """
    return greedy_with_topk(model, prompts, new_tokens, pad_id, 0, batch_size, progress, desc)[0]


@torch.inference_mode()
def greedy_with_topk(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    pad_id: int,
    k: int,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "generate",
) -> tuple[list[list[int]], torch.Tensor | None, torch.Tensor | None]:
    """Greedy continuations plus the model's top-``k`` next tokens at every generated step.

    Returns ``(continuations, logprobs [N, new_tokens, k], indices [N, new_tokens, k])``
    (the tensors are None when ``k`` is 0). Row ``t`` is the distribution the model
    sampled continuation token ``t`` from: ``indices[:, t, 0]`` is that token. Taking
    the scores from generation itself makes the teacher data cost one decoding pass.
    """
    model.eval()
    out: list[list[int]] = []
    vals, idxs = [], []
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        ids, mask = left_pad(chunk, pad_id)
        res = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            # No eos: never stop early, never force tokens.
            eos_token_id=None,
            pad_token_id=pad_id,
            output_logits=k > 0,
            return_dict_in_generate=True,
        )
        out.extend(res.sequences[:, ids.shape[1] :].tolist())
        if k:
            logp = F.log_softmax(torch.stack(res.logits, 1).float(), -1)
            v, j = logp.topk(k, dim=-1)
            vals.append(v)
            idxs.append(j)
        bar.update(len(chunk))
    bar.close()
    if not k:
        return out, None, None
    return out, torch.cat(vals), torch.cat(idxs)


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with the sequences right-padded to the longest one."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def distill(
    student: torch.nn.Module,
    ids: torch.Tensor,
    loss_mask: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    cfg: TrainConfig,
    seed: int = 0,
    hard_weight: float = 0.5,
    progress: bool = True,
    desc: str = "distill",
) -> dict:
    """Train ``student`` to predict what a teacher predicts, from ``teacher_sequences`` output.

    ``ids`` ``[N, T]`` are the sequences, ``loss_mask`` ``[N, T]`` marks positions whose
    next-token prediction counts. Per position the loss is the cross-entropy from the
    teacher's top-k distribution (renormalised; KL up to a constant) plus
    ``hard_weight`` times the cross-entropy on the teacher's argmax: the soft part
    carries the teacher's whole ranking, the hard part pushes exactly the argmax that
    speculative-decoding acceptance depends on. Batches of ``cfg.batch_size``
    sequences are drawn epoch by epoch in a seeded order.
    """
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def loss_fn(step: int) -> torch.Tensor:
        nonlocal order
        if len(order) < cfg.batch_size:
            order = torch.randperm(len(ids), generator=gen).tolist()
        sel, order = order[: cfg.batch_size], order[cfg.batch_size :]
        m = loss_mask[sel].flatten().bool()
        s_logp = F.log_softmax(student(input_ids=ids[sel]).logits.float().flatten(0, 1)[m], -1)
        t_logp = topk_logprobs[sel].flatten(0, 1)[m]
        t_idx = topk_indices[sel].flatten(0, 1)[m]
        t_p = t_logp.exp()
        t_p = t_p / t_p.sum(-1, keepdim=True)
        s_at = s_logp.gather(-1, t_idx)
        soft = -(t_p * s_at).sum(-1).mean()
        hard = -s_at[:, 0].mean()
        return soft + hard_weight * hard

    return _optimise(student, cfg, loss_fn, progress, desc)


def teacher_sequences(
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay ``greedy_with_topk`` output out as ``distill`` input.

    Returns right-padded ``(ids [N, T], loss_mask [N, T], logprobs [N, T, k],
    indices [N, T, k])`` where ``ids`` is prompt + continuation and the teacher rows
    sit at the positions that predict each continuation token (the last prompt token
    onwards); only those positions are in ``loss_mask``.
    """
    ids, _ = right_pad([list(p) + list(c) for p, c in zip(prompts, continuations)], pad_id)
    n, width = ids.shape
    k = topk_logprobs.shape[-1]
    mask = torch.zeros((n, width), dtype=torch.long)
    vals = torch.zeros((n, width, k), dtype=topk_logprobs.dtype)
    idxs = torch.zeros((n, width, k), dtype=topk_indices.dtype)
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        sl = slice(len(p) - 1, len(p) - 1 + len(c))
        mask[i, sl] = 1
        vals[i, sl] = topk_logprobs[i, : len(c)]
        idxs[i, sl] = topk_indices[i, : len(c)]
    return ids, mask, vals, idxs
