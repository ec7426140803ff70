"""Time growth of a synthetic, realistically shaped DeepSpeed checkpoint against `cp -r` (prints JSON).

Default: the ``ul2-1.1b`` preset's 12 layers, ZeRO-2, DP=4, TP=2, fp32 (the optimizer files of a
bf16 run look the same; only the module copy in ``mp_rank_*`` would be half as big). The source is
written in DeepSpeed's exact on-disk format (module shards per TP rank; flat fp32 partitions, Adam
moments and ``param_slice_mappings`` per DP x TP rank) without running DeepSpeed, then grown
12 -> 16 layers with ``tools/grow_checkpoint.py`` in a subprocess whose memory is sampled:

* ``peak_rss_bytes``: max resident set (includes file pages mapped by ``mmap`` loads, which the
  kernel can drop at will);
* ``peak_rss_anon_bytes``: max *anonymous* resident memory (what the tool itself allocated),
  and the same for a process that only imports torch + deepspeed + lag_ds (``import_baseline``);
  ``peak_rss_anon_above_baseline_over_largest_shard`` is the number to compare with 1.

    python benchmarks/grow_checkpoint_benchmark.py --workdir /tmp/lagbench            # 1.1B, ~18 GB on disk
    python benchmarks/grow_checkpoint_benchmark.py --hidden 512 --ffn 1280 --heads 8  # quick
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
from json_stdout import keep_stdout_for_json

REPO = Path(__file__).resolve().parents[1]


def layer_shapes(h: int, f: int, tp: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        ("input_layernorm.weight", (h,)),
        ("self_attention.linear_proj.weight", (h, h // tp)),
        ("self_attention.linear_qkv.weight", (3 * h // tp, h)),
        ("pre_mlp_layernorm.weight", (h,)),
        ("mlp.linear_fc1.weight", (2 * f // tp, h)),
        ("mlp.linear_fc2.weight", (h, f // tp)),
    ]


def param_shapes(*, layers: int, h: int, f: int, vocab: int, seq: int, tp: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("embedding.word_embeddings.weight", (vocab // tp, h)), ("embedding.position_embeddings.weight", (seq, h))]
    for i in range(layers):
        out += [(f"decoder.layers.{i}.{s}", shape) for s, shape in layer_shapes(h, f, tp)]
    return out + [("decoder.final_layernorm.weight", (h,))]


def _lr_scheduler_state(step: int) -> dict:
    """A LambdaLR state at ``step`` (what the trainer saves), so the grown output also loads in
    ``python -m lag_ds.train`` (the 1.1B start-up figure in benchmarks/README.md)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    state = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0).state_dict()
    return {**state, "last_epoch": step, "_step_count": step + 1}


def write_synthetic(root: Path, *, layers: int, h: int, f: int, vocab: int, seq: int, tp: int, dp: int,
                    step: int) -> Path:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    tag = root / f"global_step{step}"
    tag.mkdir(parents=True)
    ds_config = {"train_batch_size": 256, "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}
    shapes = param_shapes(layers=layers, h=h, f=f, vocab=vocab, seq=seq, tp=tp)
    for t in range(tp):
        module = OrderedDict()
        for name, shape in shapes:
            module[name] = torch.empty(shape).normal_(0, 0.02)
            if name.endswith(("linear_proj.weight", "linear_qkv.weight", "linear_fc1.weight", "linear_fc2.weight")):
                module[name.replace(".weight", "._extra_state")] = None
        module["output_layer._extra_state"] = None
        torch.save({"module": module, "buffer_names": [], "optimizer": None, "param_shapes": None,
                    "lr_scheduler": _lr_scheduler_state(step), "skipped_steps": 0,
                    "global_steps": step, "global_samples": step * 256, "dp_world_size": dp, "mp_world_size": tp,
                    "ds_config": ds_config, "ds_version": "0.19.8", "num_layers": layers}, tag / f"mp_rank_{t:02d}_model_states.pt")
        total = sum(math.prod(s) for _, s in shapes)
        part = -(-total // dp)
        flat = torch.cat([module[n].flatten() for n, _ in shapes])
        del module
        flat = torch.nn.functional.pad(flat, (0, part * dp - total))
        offsets, acc = [], 0
        for name, shape in shapes:
            offsets.append((name, acc, math.prod(shape)))
            acc += math.prod(shape)
        for d in range(dp):
            lo, hi = d * part, (d + 1) * part
            mapping = OrderedDict()
            for name, start, numel in offsets:
                a, b = max(start, lo), min(start + numel, hi)
                if a < b:
                    mapping[name] = fragment_address(numel=b - a, start=a - lo)
            fp32 = flat[lo:hi].clone()
            state = {"step": torch.tensor(float(step)), "exp_avg": torch.empty(part).normal_(0, 1e-3),
                     "exp_avg_sq": torch.empty(part).uniform_(0, 1e-6)}
            osd = {"loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False, "clip_grad": 1.0,
                   "base_optimizer_state": {"state": {0: state}, "param_groups": [
                       {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0, "params": [0]}]},
                   "single_partition_of_fp32_groups": [fp32], "zero_stage": ZeroStageEnum.gradients,
                   "group_paddings": [part * dp - total if d == dp - 1 else 0], "param_alignment_paddings": [[]],
                   "partition_count": [dp], "ds_version": "0.19.8", "param_slice_mappings": [mapping]}
            torch.save({"optimizer_state_dict": osd, "ds_config": ds_config, "ds_version": "0.19.8"},
                       tag / f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt")
        del flat
    (root / "latest").write_text(tag.name)
    return root


def run_sampled(cmd: list[str]) -> dict:
    """Run ``cmd``; sample VmRSS and RssAnon of the child every 50 ms."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"rss": 0, "anon": 0}

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                peak["rss"] = max(peak["rss"], int(fields["VmRSS"].split()[0]) * 1024)
                peak["anon"] = max(peak["anon"], int(fields["RssAnon"].split()[0]) * 1024)
            except (FileNotFoundError, KeyError, ProcessLookupError):
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"grow failed ({proc.returncode}): {err[-2000:]}")
    return {"wall_s": wall, "peak_rss_bytes": peak["rss"], "peak_rss_anon_bytes": peak["anon"], "stdout": out.strip()}


def _prepare_cache(mode: str) -> None:
    """``cold``: write back dirty pages and drop the page cache, so the next command reads from disk."""
    if mode == "cold":
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def du(path: Path) -> int:
    from lag_ds.checkpoint.universal_links import disk_usage

    return disk_usage([path])["bytes_on_disk"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lag_ds_grow_bench"))
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5120)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=256_000)
    p.add_argument("--seq", type=int, default=1280)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dp", type=int, default=4)
    p.add_argument("--op", default="k=4,i0=4,b=2,init=duplicate")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and outputs")
    p.add_argument("--repeat", type=int, default=1,
                   help="interleaved cp / grow trials (the disk of a shared VM varies 2-3x between "
                        "minutes); medians are reported, and every trial's figures")
    p.add_argument("--cache", choices=("cold", "as-is"), default="cold" if os.geteuid() == 0 else "as-is",
                   help="cold: sync and drop the page cache before every timed command (needs root; "
                        "the default as root), so cp and grow both read the source from disk; "
                        "as-is: leave the cache alone (the source is partly cached after synthesis)")
    p.add_argument("--src", type=Path, default=None,
                   help="reuse a synthetic source written by an earlier --keep run (its shape "
                        "arguments are then ignored)")
    args = p.parse_args(argv)
    emit = keep_stdout_for_json()  # DeepSpeed prints to stdout; the JSON alone goes there

    if args.src is not None:
        src, make_s = args.src.resolve(), None
        if not (src / "latest").is_file():
            raise SystemExit(f"--src {src}: not a synthetic source (no 'latest')")
        for name in ("copy", "grown"):
            shutil.rmtree(args.workdir / name, ignore_errors=True)
        args.workdir.mkdir(parents=True, exist_ok=True)
    else:
        if args.workdir.exists():
            shutil.rmtree(args.workdir)
        args.workdir.mkdir(parents=True)
        src = args.workdir / "src"
        t0 = time.perf_counter()
        write_synthetic(src, layers=args.layers, h=args.hidden, f=args.ffn, vocab=args.vocab, seq=args.seq,
                        tp=args.tp, dp=args.dp, step=300_000)
        make_s = time.perf_counter() - t0
    files = [f for f in src.rglob("*.pt")]
    largest = max(f.stat().st_size for f in files)
    # largest full (TP-merged) fp32 tensor: every matrix but the position embeddings is TP-split
    tensor = max(math.prod(shape) * 4 * (args.tp if len(shape) == 2 and "position" not in name else 1)
                 for name, shape in param_shapes(layers=1, h=args.hidden, f=args.ffn,
                                                 vocab=args.vocab, seq=args.seq, tp=args.tp))
    subprocess.run(["sync"], check=True)

    cp_times, grow_times, grows = [], [], []
    for trial in range(args.repeat):  # interleaved, so both see the same disk and page cache moods
        _prepare_cache(args.cache)
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(src), str(args.workdir / "copy")], check=True)
        subprocess.run(["sync"], check=True)
        cp_times.append(time.perf_counter() - t0)
        shutil.rmtree(args.workdir / "copy")
        subprocess.run(["sync"], check=True)

        shutil.rmtree(args.workdir / "grown", ignore_errors=True)
        subprocess.run(["sync"], check=True)
        _prepare_cache(args.cache)
        grow = run_sampled([sys.executable, str(REPO / "tools/grow_checkpoint.py"), "--src", str(src),
                            "--dst", str(args.workdir / "grown"), "--op", args.op, "--no-progress"])
        t0 = time.perf_counter()
        subprocess.run(["sync"], check=True)
        grow["wall_s_incl_sync"] = grow["wall_s"] + time.perf_counter() - t0
        grow_times.append(grow["wall_s_incl_sync"])
        grows.append(grow)
    baseline = run_sampled([sys.executable, "-c", "import time, torch, deepspeed, lag_ds.checkpoint.deepspeed_grow; "
                            "import lag_ds.checkpoint.grow; time.sleep(0.5)"])
    grow = max(grows, key=lambda g: g["peak_rss_anon_bytes"])
    cp_s = statistics.median(cp_times)
    ratios = [g / c for g, c in zip(grow_times, cp_times)]
    report = {
        "benchmark": "grow_checkpoint",
        "source": {"layers": args.layers, "hidden": args.hidden, "ffn": args.ffn, "vocab": args.vocab,
                   "zero_stage": 2, "tp": args.tp, "dp": args.dp, "files": len(files),
                   "bytes": du(src), "largest_shard_bytes": largest, "synthesis_s": make_s},
        "op": args.op,
        "cache": args.cache,
        "trials": args.repeat,
        "cp_r_s_incl_sync": cp_s,
        "cp_r_s_trials": [round(t, 2) for t in cp_times],
        "grow": {"wall_s_incl_sync": statistics.median(grow_times),
                 "wall_s_incl_sync_trials": [round(t, 2) for t in grow_times],
                 "peak_rss_bytes": max(g["peak_rss_bytes"] for g in grows),
                 "peak_rss_anon_bytes": grow["peak_rss_anon_bytes"]},
        "grown_bytes": du(args.workdir / "grown"),
        "grow_over_cp": statistics.median(grow_times) / cp_s,
        "grow_over_cp_trials": [round(r, 2) for r in ratios],
        "import_baseline_rss_anon_bytes": baseline["peak_rss_anon_bytes"],
        "peak_rss_anon_over_largest_shard": grow["peak_rss_anon_bytes"] / largest,
        "peak_rss_anon_above_baseline_over_largest_shard":
            (grow["peak_rss_anon_bytes"] - baseline["peak_rss_anon_bytes"]) / largest,
        "peak_rss_over_largest_shard": grow["peak_rss_bytes"] / largest,
        # the bound is on the largest tensor (fp32, TP-merged): the embedding here
        "largest_tensor_bytes": tensor,
        "peak_rss_anon_above_baseline_over_largest_tensor":
            (grow["peak_rss_anon_bytes"] - baseline["peak_rss_anon_bytes"]) / tensor,
    }
    emit(report)
    if not args.keep:
        shutil.rmtree(args.workdir / "grown", ignore_errors=True)
        if args.src is None:
            shutil.rmtree(args.workdir)
    return report


if __name__ == "__main__":
    main()
