"""How far harvested reference log-probs are from a reference pass, per dtype (fp32, bf16, 4-bit NF4).

    python benchmarks/logprob_gap.py                      # the embedded SmolLM2-135M, CPU
    python benchmarks/logprob_gap.py --model /path/to/hf_folder --prompts 4 --samples 2

The loop keeps the log-prob of each sampled response, summed over its tokens as the engine decodes
it (one token at a time, with a key/value cache), and uses it as the DPO round's reference log-prob
instead of a reference pass. That is exact only if the incremental decode and the training-style
forward (one padded batch of whole sequences, ``srlm.models.logprobs.response_logps``) compute the
same numbers. This measures, for each precision, the per-sequence gap |harvested - reference pass|
on the same model and the same sampled tokens.

What the DPO margin can bear: a reference error d on one side shifts the pair's implicit reward
margin by beta * d. At beta = 0.1, d = 0.05 nats moves the margin by 0.005, a change of about 0.1%
in the first step's loss (ln 2): harmless. The threshold ``--max_gap`` (0.05) is that bound; the
loop harvests only in precisions whose maximum gap is below it (``srlm.selfreward.steps``:
harvesting is on for fp32 weights only) and recomputes the reference otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from srlm.data.batching import collate_sequences  # noqa: E402
from srlm.data.chat import encode_prompt  # noqa: E402
from srlm.models.backbone import DEFAULT_MODEL, load_tokenizer, resolve_model_path  # noqa: E402
from srlm.models.logprobs import response_logps  # noqa: E402
from srlm.inference.engine import Engine, Sampling  # noqa: E402

PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France, and why is it famous?",
           "Explain photosynthesis in two sentences.", "Write a haiku about autumn.",
           "How do I reverse a list in Python?", "Name four planets of the solar system.",
           "Why is the sky blue?", "Suggest a name for a pet turtle."]


def load(model: str, precision: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_model_path(model)
    if precision == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        net = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16)
    else:
        net = AutoModelForCausalLM.from_pretrained(path, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
    net.config.use_cache = True
    return net.eval()


def gaps(model: str, precision: str, prompts: list[str], samples: int, max_new_tokens: int, seed: int) -> dict:
    tok = load_tokenizer(model)
    net = load(model, precision)
    engine = Engine(net, [tok.eos_token_id], tok.pad_token_id, batch_size=len(prompts), seed=seed)
    ids = [encode_prompt(tok, p) for p in prompts]
    start = time.time()
    groups = engine.generate(ids, samples, Sampling(1.0, 1.0, max_new_tokens))
    rows = [(ids[i], s) for i, group in enumerate(groups) for s in group]
    batch = collate_sequences([p for p, _ in rows], [s.token_ids for _, s in rows], tok.pad_token_id)
    with torch.no_grad():
        reference, _ = response_logps(net, batch["input_ids"], batch["attention_mask"], batch["labels"])
    diff = [abs(s.logp - float(r)) for (_, s), r in zip(rows, reference)]
    per_token = [d / len(s.token_ids) for d, (_, s) in zip(diff, rows)]
    return {"precision": precision, "sequences": len(rows), "mean_tokens": sum(len(s.token_ids) for _, s in rows) / len(rows),
            "max_gap": max(diff), "mean_gap": sum(diff) / len(diff), "max_gap_per_token": max(per_token),
            "seconds": round(time.time() - start, 1)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--precisions", default="fp32,bf16,nf4")
    parser.add_argument("--max_gap", type=float, default=0.05, help="largest per-sequence gap the DPO margin bears")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rows = []
    print(f"{'precision':<10} {'seqs':>5} {'tokens':>7} {'max gap':>10} {'mean gap':>10} {'max/token':>10}  harvest?")
    for precision in args.precisions.split(","):
        row = gaps(args.model, precision, PROMPTS[:args.prompts], args.samples, args.max_new_tokens, args.seed)
        row["harvest_ok"] = row["max_gap"] < args.max_gap
        rows.append(row)
        print(f"{precision:<10} {row['sequences']:>5} {row['mean_tokens']:>7.1f} {row['max_gap']:>10.2e} "
              f"{row['mean_gap']:>10.2e} {row['max_gap_per_token']:>10.2e}  {'yes' if row['harvest_ok'] else 'no: recompute'}")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
