"""What Gumbel-coupled verification costs in acceptance, against the rejection rule.

An offline measurement (not a test, not part of ``llmesh bench``): per-token
acceptance of a draft proposal under

- the rejection rule of Leviathan et al. (2023): ``alpha = sum_x min(p(x), q(x))``;
- Gumbel-max coupling (the draft proposes ``argmax(log q + g)``, the target keeps
  it when it equals ``argmax(log p + g)``): ``beta = P(argmax(log p + g) =
  argmax(log q + g))``, computed exactly: the event "both pick i" is the event
  that a Gumbel race with weights ``max(p_j / p_i, q_j / q_i)`` picks i, so
  ``beta = sum_i 1 / sum_j max(p_j / p_i, q_j / q_i)``.

On the component case of issue 11 (p = (0.2, 0.4, 0.4), q = (0.6, 0.3, 0.1)),
also through the code paths (``accept_gumbel`` over seeds), and on the built
target/draft pair (``~/.cache/llmesh/models``) at T = 1 and T = 0.7 along the
target's own sampled continuations of a few prompts. Expected tokens per round
at gamma 4 assume independent positions: ``(1 - a**5) / (1 - a)``.

    python benchmarks/gumbel_acceptance.py [--models DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.engine.sampler import gumbel_argmax, warp
from services.engine.sequence import SamplingOptions
from services.speculative.rejection_sampler import accept_gumbel

PROMPTS = ["The meaning of", "import", "def main(", "In the beginning the"]


def rejection_acceptance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_x min(p, q) per row of ``[n, vocab]`` distributions."""
    return torch.minimum(p, q).sum(-1)


def gumbel_acceptance(p: torch.Tensor, q: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """P(argmax(log p + g) = argmax(log q + g)) per row, exactly (module docstring)."""
    out = torch.zeros(p.shape[0], dtype=torch.float64)
    for r in range(p.shape[0]):
        pr, qr = p[r].double(), q[r].double()
        support = torch.nonzero((pr > 0) & (qr > 0)).flatten()
        total = 0.0
        for s in range(0, len(support), chunk):
            i = support[s:s + chunk]
            ratio = torch.maximum(pr[None, :] / pr[i, None], qr[None, :] / qr[i, None])  # [chunk, vocab]
            total += float((1.0 / ratio.sum(-1)).sum())
        out[r] = total
    return out


def tokens_per_round(a: float, gamma: int = 4) -> float:
    return (1 - a ** (gamma + 1)) / (1 - a) if a < 1 else gamma + 1.0


def component_case(seeds: int = 20_000) -> dict:
    p = torch.tensor([[0.2, 0.4, 0.4]], dtype=torch.float64)
    q = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    log_p, log_q = torch.log(torch.cat([p, p])), torch.log(q)
    kept, counts = 0, [0, 0, 0]
    for seed in range(seeds):
        proposal = [gumbel_argmax(log_q[0], seed, 0)]
        n, token = accept_gumbel(log_p, proposal, seed, 0)
        kept += n
        counts[proposal[0] if n else token] += 1
    return {"rejection": float(rejection_acceptance(p, q)[0]), "gumbel_exact": float(gumbel_acceptance(p, q)[0]),
            "gumbel_sampled": kept / seeds, "gumbel_emitted": [c / seeds for c in counts], "seeds": seeds}


@torch.inference_mode()
def built_models(models: Path, temperature: float, new_tokens: int = 48, seed: int = 7) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(models / "target")
    target = AutoModelForCausalLM.from_pretrained(models / "target").eval()
    draft = AutoModelForCausalLM.from_pretrained(models / "draft").eval()
    opts = SamplingOptions(temperature=temperature)
    alphas, betas = [], []
    for k, prompt in enumerate(PROMPTS):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        for t in range(new_tokens):  # the target's own sampled continuation
            logits = target(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(gumbel_argmax(torch.log(warp(logits, opts)), seed + k, len(ids)))
        n = len(ids) - new_tokens
        p = warp(target(input_ids=torch.tensor([ids])).logits[0, n - 1:-1], opts)
        q = warp(draft(input_ids=torch.tensor([ids])).logits[0, n - 1:-1, :p.shape[-1]], opts)
        alphas.append(rejection_acceptance(p, q))
        betas.append(gumbel_acceptance(p, q))
    a, b = float(torch.cat(alphas).mean()), float(torch.cat(betas).mean())
    return {"temperature": temperature, "positions": int(sum(len(x) for x in alphas)), "rejection": a,
            "gumbel": b, "tokens_per_round_gamma4": {"rejection": tokens_per_round(a), "gumbel": tokens_per_round(b)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path.home() / ".cache/llmesh/models")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"component": component_case(), "built": [built_models(args.models, t) for t in (1.0, 0.7)]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
