"""Build the default models offline and deterministically: ``llmesh models build``.

``build_models(home)`` creates, under ``home / "models"``:

* ``target/``: a small Llama (about 4M parameters) trained on the train split of the
  corpus that ships with Python (``corpus.py``);
* ``draft/``: about ten times smaller, distilled from the target's own greedy
  predictions (what speculative-decoding acceptance depends on);
* ``target-large/``: the trained target embedded in a much larger shape that predicts
  exactly the same tokens (``grow.py``): it costs what a large checkpoint costs.

Contracts:

* Each directory loads with ``AutoModelForCausalLM.from_pretrained(dir)`` and
  ``AutoTokenizer.from_pretrained(dir)`` (float32 Llama, same byte-level BPE tokenizer
  in all three; ``<|endoftext|>`` id 0 is eos = bos = pad; no bos is added when
  encoding; context ``max_position_embeddings`` = 2048).
* A directory is complete once its ``llmesh-build.json`` exists: it is written last,
  into a staging directory that is then renamed into place, so a crash never leaves a
  half-written model that looks complete. Complete models are kept unless ``force``
  or their ``recipe`` (seed, sizes, steps) differs from the current plan's; the draft
  and the large model record the target they came from and are rebuilt when the
  target changes.
* The same seed gives the same models on the same machine and thread count (torch is
  set to ``BuildPlan.threads`` threads while building and restored afterwards).
* Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from services.common.paths import default_home

from . import corpus
from .grow import grow_llama
from .measure import argmax_agreement, equivalence, generation_speed
from .tokenizer import CHAT_TEMPLATE, train_tokenizer
from .train import (
    TrainConfig,
    distill,
    evaluate_loss,
    greedy_continuations,
    greedy_with_topk,
    teacher_sequences,
    token_stream,
    train_causal_lm,
)

MARKER = "llmesh-build.json"
MODEL_NAMES = ("target", "draft", "target-large")


@dataclass(frozen=True)
class LlamaShape:
    """The size of one Llama model (vocab and context come from ``BuildPlan``)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    head_dim: int = 32
    tie_word_embeddings: bool = True

    def config(self, vocab_size: int, max_position_embeddings: int, eos_id: int) -> LlamaConfig:
        heads = self.hidden_size // self.head_dim
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )


@dataclass(frozen=True)
class BuildPlan:
    """Every size and step count of the build. The defaults are the shipped models."""

    vocab_size: int = 4096
    max_position_embeddings: int = 2048
    threads: int = 2
    target: LlamaShape = LlamaShape(hidden_size=256, num_hidden_layers=4, intermediate_size=688)
    draft: LlamaShape = LlamaShape(hidden_size=64, num_hidden_layers=2, intermediate_size=172)
    # 4x the target's width (so the residual scale sqrt(4) = 2 is exact) and 6 layers:
    # 84M parameters, about 30 ms per token at batch 1 on 2 CPU cores.
    large: LlamaShape = LlamaShape(hidden_size=1024, num_hidden_layers=6, intermediate_size=2752)
    # 360 steps x 8 x 256 tokens: about 3 epochs of the ~314k-token train split, the
    # bulk of the build time (about 2.5 minutes on 2 cores).
    target_train: TrainConfig = TrainConfig(steps=360, batch_size=8, block_size=256, lr=5e-3)
    # Long continuations (192 tokens) teach the draft to follow the target deep into a
    # generation: with 64-token ones agreement fell from 81% on the first 64 tokens
    # to 73% on tokens 128-256; with these it stays at 79%.
    distill_prompts: int = 512
    distill_new_tokens: int = 192
    distill_topk: int = 64
    distill_max_prompt_tokens: int = 24
    draft_train: TrainConfig = TrainConfig(steps=600, batch_size=16, lr=5e-3, warmup_steps=10)
    # draft_agreement is measured on the first eval_new_tokens tokens of the target's
    # greedy continuations of eval_prompts held-out prompts; the report also breaks
    # down agreement up to eval_long_tokens.
    eval_prompts: int = 64
    eval_new_tokens: int = 64
    eval_long_tokens: int = 256
    bench_new_tokens: int = 64
    large_bench_new_tokens: int = 32
    large_check_prompts: int = 8
    large_check_tokens: int = 32


@dataclass
class _Ctx:
    """What the stages share while one build runs."""

    models: Path
    seed: int
    plan: BuildPlan
    progress: bool
    log: Callable[[str], None]
    train_docs: list = field(default_factory=list)
    heldout_docs: list = field(default_factory=list)
    tokenizer: PreTrainedTokenizerFast | None = None
    target: LlamaForCausalLM | None = None
    target_fingerprint: str = ""

    def encode(self, texts: list[str]) -> list[list[int]]:
        # The backend encoder directly: no "longer than model_max_length" warnings for
        # whole documents, and no special tokens are added either way.
        return [e.ids for e in self.tokenizer.backend_tokenizer.encode_batch(texts)]


def read_report(model_dir: Path) -> dict | None:
    """The build report of a complete model directory, or None when it is not complete."""
    try:
        return json.loads((Path(model_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _fingerprint(model_dir: Path) -> str:
    """sha256 of a saved model's weights: identifies the target a draft was built from."""
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _params(model: torch.nn.Module) -> int:
    # Unique tensors: a tied head is not counted twice.
    return sum(p.numel() for p in model.parameters())


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _save(ctx: _Ctx, name: str, model: LlamaForCausalLM, report: dict) -> Path:
    """Write model + tokenizer + report atomically into ``models/name``; return the dir."""
    final = ctx.models / name
    staging = ctx.models / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.generation_config.eos_token_id = ctx.tokenizer.eos_token_id
    model.generation_config.bos_token_id = ctx.tokenizer.bos_token_id
    model.generation_config.pad_token_id = ctx.tokenizer.pad_token_id
    model.save_pretrained(staging)
    ctx.tokenizer.save_pretrained(staging)
    for path in staging.iterdir():
        # safetensors writes 0600; the models are shared by every service and user.
        path.chmod(0o644)
    report = dict(report, size_bytes=_dir_bytes(staging), path=str(final), recipe=recipe(ctx.plan, ctx.seed, name))
    if name == "target":
        report["fingerprint"] = _fingerprint(staging)
    # The marker goes last: its presence means everything above is on disk.
    (staging / MARKER).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


def _shape_report(model: LlamaForCausalLM) -> dict:
    c = model.config
    return {
        "parameters": _params(model),
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "eos_token_id": c.eos_token_id,
    }


def _heldout_prompt_ids(ctx: _Ctx, n: int) -> list[list[int]]:
    # Seed 0 always: the same held-out prompts whatever the build seed.
    return ctx.encode(corpus.heldout_prompts(n, seed=0, documents=ctx.train_docs + ctx.heldout_docs))


def _build_target(ctx: _Ctx) -> dict:
    plan, start = ctx.plan, time.perf_counter()
    ctx.log("target: training tokenizer")
    ctx.tokenizer = train_tokenizer(
        [d.text for d in ctx.train_docs], plan.vocab_size, model_max_length=plan.max_position_embeddings
    )
    eos = ctx.tokenizer.eos_token_id
    stream = token_stream(ctx.encode([d.text for d in ctx.train_docs]), eos)
    heldout = token_stream(ctx.encode([d.text for d in ctx.heldout_docs]), eos)
    torch.manual_seed(ctx.seed)
    model = LlamaForCausalLM(plan.target.config(plan.vocab_size, plan.max_position_embeddings, eos))
    ctx.log(f"target: {_params(model) / 1e6:.2f}M parameters, {len(stream)} train tokens")
    stats = train_causal_lm(model, stream, plan.target_train, seed=ctx.seed, progress=ctx.progress, desc="target")
    prompts = _heldout_prompt_ids(ctx, 32)
    report = {
        "name": "target",
        "seed": ctx.seed,
        **_shape_report(model),
        "train_tokens": len(stream),
        "train": dict(stats, config=dataclasses.asdict(plan.target_train)),
        "heldout_loss": evaluate_loss(model, heldout, plan.target_train.block_size),
        "speed_batch1": generation_speed(model, prompts, 1, plan.bench_new_tokens, eos, repeats=3),
        "speed_batch32": generation_speed(model, prompts, 32, plan.bench_new_tokens, eos, repeats=1),
        "build_seconds": time.perf_counter() - start,
    }
    report = read_report(_save(ctx, "target", model, report))
    ctx.target, ctx.target_fingerprint = model, report["fingerprint"]
    return report


def _load_target(ctx: _Ctx) -> None:
    path = ctx.models / "target"
    ctx.tokenizer = AutoTokenizer.from_pretrained(path)
    ctx.target = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _build_draft(ctx: _Ctx) -> dict:
    plan, start, eos = ctx.plan, time.perf_counter(), ctx.tokenizer.eos_token_id
    # Teacher data: the target's greedy continuations of train prompts, with its top-k
    # next-token distribution at every generated step (one decoding pass in all).
    ctx.log(f"draft: target greedy continuations of {plan.distill_prompts} train prompts")
    candidates = corpus.prompts_from([d.text for d in ctx.train_docs], 3 * plan.distill_prompts, seed=ctx.seed + 1)
    # Short prompts only: the batch is padded to its longest sequence.
    prompts = [p for p in ctx.encode(candidates) if len(p) <= plan.distill_max_prompt_tokens]
    prompts = prompts[: plan.distill_prompts]
    conts, logp, idx = greedy_with_topk(
        ctx.target, prompts, plan.distill_new_tokens, eos, plan.distill_topk, progress=ctx.progress, desc="teacher data"
    )
    data = teacher_sequences(prompts, conts, logp, idx, eos)
    torch.manual_seed(ctx.seed + 1)
    draft = LlamaForCausalLM(plan.draft.config(plan.vocab_size, plan.max_position_embeddings, eos))
    ctx.log(f"draft: {_params(draft) / 1e6:.2f}M parameters, distilling on {int(data[1].sum())} positions")
    stats = distill(draft, *data, plan.draft_train, seed=ctx.seed + 1, progress=ctx.progress)
    # Agreement on unseen text: the target's greedy continuations of held-out prompts.
    eval_prompts = _heldout_prompt_ids(ctx, plan.eval_prompts)
    long = max(plan.eval_new_tokens, plan.eval_long_tokens)
    eval_conts = greedy_continuations(ctx.target, eval_prompts, long, eos, batch_size=64)
    agreement = argmax_agreement(draft, ctx.target, eval_prompts, [c[: plan.eval_new_tokens] for c in eval_conts])
    agreement.pop("by_range")
    ranges = [(a, b) for a, b in ((0, 64), (64, 128), (128, 256), (256, 512)) if b <= long]
    agreement_long = argmax_agreement(draft, ctx.target, eval_prompts, eval_conts, ranges=ranges)["by_range"]
    target_params = _params(ctx.target)
    report = {
        "name": "draft",
        "seed": ctx.seed,
        **_shape_report(draft),
        "target_fingerprint": ctx.target_fingerprint,
        "target_parameters_ratio": target_params / _params(draft),
        "draft_agreement": agreement["agreement"],
        "agreement": dict(agreement, prompts=len(eval_prompts), new_tokens=plan.eval_new_tokens),
        "agreement_by_position": agreement_long,
        "distill": dict(
            stats,
            prompts=len(prompts),
            new_tokens=plan.distill_new_tokens,
            topk=plan.distill_topk,
            config=dataclasses.asdict(plan.draft_train),
        ),
        "speed_batch1": generation_speed(draft, eval_prompts, 1, plan.bench_new_tokens, eos, repeats=3),
        "speed_batch32": generation_speed(draft, eval_prompts, 32, plan.bench_new_tokens, eos, repeats=1),
        "build_seconds": time.perf_counter() - start,
    }
    return read_report(_save(ctx, "draft", draft, report))


def _build_large(ctx: _Ctx) -> dict:
    plan, start, eos = ctx.plan, time.perf_counter(), ctx.tokenizer.eos_token_id
    shape = plan.large
    ctx.log(f"target-large: embedding the target in hidden {shape.hidden_size} x {shape.num_hidden_layers} layers")
    large = grow_llama(ctx.target, shape.hidden_size, shape.num_hidden_layers, shape.intermediate_size, seed=ctx.seed)
    prompts = _heldout_prompt_ids(ctx, plan.large_check_prompts)
    check = equivalence(ctx.target, large, prompts, plan.large_check_tokens, eos)
    if not check["greedy_identical"] or check["max_abs_logit_diff"] > 1e-3:
        raise RuntimeError(f"target-large does not reproduce the target: {check}")
    report = {
        "name": "target-large",
        "seed": ctx.seed,
        **_shape_report(large),
        "target_fingerprint": ctx.target_fingerprint,
        "equivalence": check,
        "speed_batch1": generation_speed(large, prompts, 1, plan.large_bench_new_tokens, eos, repeats=2),
        "build_seconds": time.perf_counter() - start,
    }
    return read_report(_save(ctx, "target-large", large, report))


def recipe(plan: BuildPlan, seed: int, name: str) -> dict:
    """Everything that decides the weights of model ``name`` (not how it is measured).

    Stored in each report; a complete model whose recipe differs (another seed, a
    changed plan) is rebuilt, so a plan change in the code reaches every machine.
    """
    common = {
        "seed": seed,
        "vocab_size": plan.vocab_size,
        "max_position_embeddings": plan.max_position_embeddings,
        "threads": plan.threads,
    }
    if name == "target":
        specific = {"shape": plan.target, "train": plan.target_train}
    elif name == "draft":
        specific = {
            "shape": plan.draft,
            "train": plan.draft_train,
            "prompts": plan.distill_prompts,
            "new_tokens": plan.distill_new_tokens,
            "topk": plan.distill_topk,
            "max_prompt_tokens": plan.distill_max_prompt_tokens,
        }
    elif name == "target-large":
        specific = {"shape": plan.large}
    else:
        raise ValueError(f"unknown model {name!r}")
    specific = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in specific.items()}
    return {**common, **specific}


def _needs_build(ctx: _Ctx, name: str, force: bool) -> bool:
    report = read_report(ctx.models / name)
    if force or report is None or report.get("recipe") != recipe(ctx.plan, ctx.seed, name):
        return True
    # A draft or large model made from another target is stale.
    return name != "target" and report.get("target_fingerprint") != ctx.target_fingerprint


def _ensure_chat_template(model_dir: Path) -> bool:
    """Gives a kept model built before the tokenizer had a chat template that
    template (``chat_template.jinja``, which ``from_pretrained`` reads), so chat
    requests work without a rebuild. Returns whether it was added."""
    config = model_dir / "tokenizer_config.json"
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists() or not config.exists() or "chat_template" in json.loads(config.read_text()):
        return False
    jinja.write_text(CHAT_TEMPLATE)
    return True


def build_models(home: Path, seed: int = 0, force: bool = False, progress: bool = True, plan: BuildPlan | None = None) -> dict:
    """Build (or keep) ``target``, ``draft`` and ``target-large`` under ``home / "models"``.

    Returns ``{"home", "seed", "seconds", "models": {name: report}}`` where each report
    is the model's ``llmesh-build.json`` with ``"built": True`` when made by this call
    (False when an existing complete model was kept). ``progress`` shows tqdm bars
    and stage lines on stderr. ``plan`` overrides the sizes (tests, experiments).
    Raises ``RuntimeError`` when the large model does not reproduce the target.
    """
    plan = plan or BuildPlan()
    models = Path(home).expanduser() / "models"
    models.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        if progress:
            print(f"[models] {msg}", file=sys.stderr, flush=True)

    ctx = _Ctx(models=models, seed=seed, plan=plan, progress=progress, log=log)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    reports: dict[str, dict] = {}
    try:
        build_target = _needs_build(ctx, "target", force)
        if not build_target:
            reports["target"] = dict(read_report(models / "target"), built=False)
            ctx.target_fingerprint = reports["target"]["fingerprint"]
        todo = {n for n in MODEL_NAMES[1:] if build_target or _needs_build(ctx, n, force)}
        if todo and not build_target:
            _load_target(ctx)  # the draft and the large model are made from it
        if build_target or todo:
            ctx.train_docs, ctx.heldout_docs = corpus.split_documents()
        if build_target:
            reports["target"] = dict(_build_target(ctx), built=True)
        for name, builder in (("draft", _build_draft), ("target-large", _build_large)):
            if name in todo:
                reports[name] = dict(builder(ctx), built=True)
            else:
                reports[name] = dict(read_report(models / name), built=False)
        for name, report in reports.items():
            if not report["built"] and _ensure_chat_template(models / name):
                log(f"{name}: added the chat template to its tokenizer")
    finally:
        torch.set_num_threads(threads)
    summary = {
        "home": str(Path(home).expanduser()),
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "models": reports,
    }
    (models / "build-report.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    """A few lines for people: size, parameters, speed and agreement of each model."""
    lines = [f"models in {summary['home']}/models (seed {summary['seed']}, {summary['seconds']:.0f} s)"]
    for name, r in summary["models"].items():
        state = "built" if r.get("built") else "kept"
        parts = [
            f"{name:<13}",
            f"{r['parameters'] / 1e6:7.2f}M params",
            f"{r['size_bytes'] / 2**20:7.1f} MiB",
        ]
        b1 = r.get("speed_batch1")
        if b1:
            parts.append(f"{b1['ms_per_token']:6.2f} ms/token (batch 1)")
        b32 = r.get("speed_batch32")
        if b32:
            parts.append(f"{b32['tokens_per_s']:7.0f} tokens/s (batch 32)")
        if "draft_agreement" in r:
            parts.append(f"agreement {100 * r['draft_agreement']:.1f}%")
            by_pos = r.get("agreement_by_position") or {}
            if len(by_pos) > 1:
                last = max(by_pos, key=lambda k: int(k.split("-")[0]))  # JSON keys come back sorted as text
                parts.append(f"(tokens {last}: {100 * by_pos[last]:.1f}%)")
        if "equivalence" in r:
            parts.append(f"max |logit diff| {r['equivalence']['max_abs_logit_diff']:.1e}")
        if "heldout_loss" in r:
            parts.append(f"held-out loss {r['heldout_loss']:.2f}")
        parts.append(f"{state} in {r['build_seconds']:.0f} s" if r.get("built") else state)
        lines.append("  ".join(parts))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``llmesh models build``."""
    parser.add_argument("--home", type=Path, default=None, help="llmesh home (default: $LLMESH_HOME or ~/.cache/llmesh)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the build (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild models that are already complete")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run ``llmesh models build`` with parsed ``args``; prints the summary, returns the exit status."""
    home = args.home or default_home()
    try:
        summary = build_models(home, seed=args.seed, force=args.force, progress=getattr(args, "progress", True))
    except RuntimeError as exc:
        print(f"llmesh models build: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m services.models.build [--home DIR] [--seed N] [--force]``."""
    parser = argparse.ArgumentParser(prog="llmesh models build", description="Build the default models offline.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
