"""megatron-core torch_dist checkpoints of the tiny GPTModel, written and read by megatron itself.

    python tests/dist/torchdist_ckpt.py save  OUT  --layers 2 --tp 1 [--optimizer] [--dump D.pt]
    python tests/dist/torchdist_ckpt.py load  CKPT... --layers 3 --tp 2 --dump OUT.pt... [--optimizer]

``--tp N`` runs N ranks (torch.multiprocessing, gloo, one TP group). ``save`` builds the model
(seed 11) and calls ``dist_checkpointing.save(model.sharded_state_dict(), OUT)``; with
``--optimizer`` one Adam step is taken first and megatron's (non-distributed) ``FP32Optimizer``
state is saved under ``optimizer`` too. ``load`` builds a model of ``--layers`` layers at
``--tp`` (another seed, so nothing matches by accident), calls ``dist_checkpointing.load`` with
its sharded state dict and dumps, from rank 0, the full (TP-gathered) parameters, the logits on
fixed tokens and, with ``--optimizer``, the full exp_avg / exp_avg_sq per parameter.

megatron-core 0.16's torch_dist *save* path calls ``torch.cuda.synchronize`` and
``torch.cuda.current_device`` unconditionally; on a CPU-only build they are replaced by no-ops
here (the data is on the CPU already). ``FP32Optimizer`` gets its loss-scale tensor on the CPU
and steps through its torch Adam (megatron's grad-norm clipping allocates on CUDA). Loading needs
no such patch. ``--dump`` in ``save`` mode dumps the saved model the same way.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import warnings

warnings.filterwarnings("ignore")
VOCAB, SEED = 256, 11


def _setup(rank: int, world: int, port: int, tp: int):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    torch.cuda.synchronize = lambda *a, **k: None  # CPU-only torch: see the module docstring
    torch.cuda.current_device = lambda: "cpu"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)


def _model(layers: int, seed: int):
    from lag_ds.model.build import build_gpt_model
    from lag_ds.model.presets import get_preset

    return build_gpt_model(get_preset("tiny").with_layers(layers), vocab_size=VOCAB, seed=seed)


def _optimizer(model):
    import torch
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer, MegatronOptimizer

    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    # FP32Optimizer.__init__ only adds a CUDA loss-scale tensor to the base init; do it on CPU.
    opt = FP32Optimizer.__new__(FP32Optimizer)
    MegatronOptimizer.__init__(opt, adam, OptimizerConfig(optimizer="adam", lr=1e-3),
                               init_state_fn=lambda optimizer, config: None)
    opt._scale, opt.is_stub_optimizer = torch.tensor([1.0]), False
    return opt


def _batch():
    import torch

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 32), generator=g)
    mask = torch.ones(2, 1, 32, 32, dtype=torch.bool).triu(1)
    return ids, torch.arange(32).expand(2, 32), mask


def _gather(t, rule_dim):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if rule_dim is None or tp == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return parts


def _full(name, param, parts):
    """Merge TP shards with lag_ds's own rule (GLU fc1 halves split separately)."""
    from lag_ds.checkpoint.megatron_layout import TpRule, merge_tp, tp_rule

    if not isinstance(parts, list):
        return parts
    rule = tp_rule(name, glu=True)
    return merge_tp(parts, TpRule(rule.cat_dim, rule.num_sub_params))


def _worker(rank, world, port, args):
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from lag_ds.checkpoint.megatron_layout import tp_rule

    _setup(rank, world, port, args.tp)
    for path, dump_path in zip(args.path, args.dump or [None] * len(args.path)):
        if args.mode == "save":
            model = _model(args.layers, SEED)
            sd = model.sharded_state_dict()
            states = {}
            if args.optimizer:
                opt = _optimizer(model)
                ids, pos, mask = _batch()
                model(ids, pos, mask).float().pow(2).mean().backward()
                opt.optimizer.step()
                states = opt.optimizer.state
                sd = {"model": sd, "optimizer": opt.sharded_state_dict(sd)}
            dist_checkpointing.save(sd, path)
        else:
            model = _model(args.layers, SEED + 100)
            sd = model.sharded_state_dict()
            opt = None
            if args.optimizer:
                opt = _optimizer(model)
                ids, pos, mask = _batch()
                model(ids, pos, mask).float().pow(2).mean().backward()
                opt.optimizer.step()  # materialise the state megatron will overwrite
                sd = {"model": sd, "optimizer": opt.sharded_state_dict(sd, is_loading=True)}
            loaded = dist_checkpointing.load(sd, path)
            model.load_state_dict(loaded["model"] if args.optimizer else loaded)
            states = {}
            if opt is not None:  # torch Adam numbers its parameters in order (one param group)
                by_id = loaded["optimizer"]["state"]
                states = {p: by_id[i] for i, p in enumerate(model.parameters())}
        if dump_path:  # the saved model as it was, or the loaded one
            dump = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
            for name, p in model.named_parameters():
                rule = tp_rule(name, glu=True).cat_dim
                dump["params"][name] = _full(name, p, _gather(p.data, rule))
                if states:
                    for key in ("exp_avg", "exp_avg_sq"):
                        dump[key][name] = _full(name, p, _gather(states[p][key], rule))
            with torch.no_grad():
                logits = model.eval()(*_batch())
            parts = _gather(logits, 0)
            dump["logits"] = torch.cat(parts, dim=-1) if isinstance(parts, list) else parts
            if rank == 0:
                torch.save(dump, dump_path)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("save", "load"))
    p.add_argument("path", nargs="+", help="one for save; several for load (one process)")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dump", nargs="+", help="one file per path")
    p.add_argument("--optimizer", action="store_true")
    args = p.parse_args(argv)
    with socket.socket() as sock:  # not lag_ds.train.distributed: keep this parent light
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if args.mode == "save":
        os.makedirs(args.path[0], exist_ok=True)
    if args.tp == 1:
        _worker(0, 1, port, args)
    else:
        import torch.multiprocessing as mp

        mp.start_processes(_worker, args=(args.tp, port, args), nprocs=args.tp,
                           start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
