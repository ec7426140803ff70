"""Tokens/s of a UL2 training step vs a plain causal-LM step on the same model (prints JSON).

Both steps run through the same DeepSpeed engine (config from ``--ds-config``) on the same
token windows. The UL2 step uses the real batch source (mixture of denoisers, arbitrary prefix
masks: SDPA's masked path); the causal step passes no mask (SDPA's ``is_causal`` fast path) and a
full loss mask. Batch construction time is reported separately from the model step.

    python benchmarks/ul2_vs_causal_throughput.py --preset small --steps 10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from json_stdout import keep_stdout_for_json


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--ds-config", default="ds_configs/cpu_zero0.json")
    p.add_argument("--cache-dir", default=".cache/lag_ds")
    p.add_argument("--data-vocab", type=int, default=8000)
    args = p.parse_args(argv)
    emit = keep_stdout_for_json()  # DeepSpeed prints to stdout; the JSON alone goes there

    from lag_ds.data import DataConfig, Ul2BatchSource, prepare_data
    from lag_ds.model.build import build_gpt_model
    from lag_ds.model.presets import get_preset
    from lag_ds.train.config import TrainConfig
    from lag_ds.train.distributed import init_distributed
    from lag_ds.train.engine import initialize_engine

    init_distributed(tensor_parallel=1)
    data = prepare_data(DataConfig(vocab_size=args.data_vocab), Path(args.cache_dir))
    tok = data.tokenizer()
    model_cfg = get_preset(args.preset)
    seq = model_cfg.seq_length
    model = build_gpt_model(model_cfg, vocab_size=model_cfg.padded_vocab_size(tok.vocab_size), seed=0)
    cfg = TrainConfig(preset=args.preset, global_batch_size=args.micro_batch, micro_batch_size=args.micro_batch,
                      ds_config=args.ds_config)
    engine, *_ = initialize_engine(cfg, model)
    source = Ul2BatchSource(data.train_dataset(), tok, seq_len=seq, global_batch_size=args.micro_batch, seed=0)

    def step(tokens, labels, mask, loss_mask) -> None:
        per_token = engine(tokens, torch.arange(seq).expand_as(tokens), mask, labels=labels)
        loss = (per_token * loss_mask).sum() / loss_mask.sum()
        engine.backward(loss)
        engine.step()

    # Interleave the two modes step by step so that warm-up, allocator and thermal effects hit both alike.
    timings = {mode: {"build_s": 0.0, "step_s": 0.0} for mode in ("causal", "ul2")}
    for i in range(args.warmup + args.steps):
        for mode in ("causal", "ul2"):
            t0 = time.perf_counter()
            batch = source.global_batch(i)
            if mode == "causal":
                tokens, labels = batch.tokens, batch.tokens.roll(-1, dims=1)
                mask, loss_mask = None, torch.ones_like(batch.loss_mask)
            else:
                tokens, labels, mask, loss_mask = batch.tokens, batch.labels, batch.attention_mask, batch.loss_mask
            t1 = time.perf_counter()
            step(tokens, labels, mask, loss_mask)
            t2 = time.perf_counter()
            if i >= args.warmup:
                timings[mode]["build_s"] += t1 - t0
                timings[mode]["step_s"] += t2 - t1
    tokens_total = args.steps * args.micro_batch * seq
    results = {
        mode: {
            "tokens_per_s": tokens_total / t["step_s"],
            "tokens_per_s_incl_batch_build": tokens_total / (t["step_s"] + t["build_s"]),
            "step_s": t["step_s"] / args.steps,
            "batch_build_s": t["build_s"] / args.steps,
        }
        for mode, t in timings.items()
    }
    report = {
        "benchmark": "ul2_vs_causal_throughput", "preset": args.preset, "seq_length": seq,
        "micro_batch": args.micro_batch, "steps": args.steps, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(), **results,
        "ul2_over_causal": results["ul2"]["tokens_per_s"] / results["causal"]["tokens_per_s"],
    }
    emit(report)
    return report


if __name__ == "__main__":
    main()
