"""Stock-DeepSpeed ``PipelineModule`` checkpoints (no lag_ds code): write one, or load one and dump it.

Run under the deepspeed launcher (gloo on CPU). The model mimics the layer-file layouts of the big
pipe stacks, built from ``LayerSpec`` / ``TiedLayerSpec`` lists:

* ``STYLE=megatron``      Megatron-DeepSpeed ``GPTModelPipe`` today: index 0 a function, ``layer_01``
  tied embedding, ``layer_02..`` transformer layers (``self_attention.query_key_value`` ...), then
  the final norm (keys ``weight``/``bias``), then the tied head (or ``lm_head.weight`` untied).
* ``STYLE=megatron_old``  BLOOM-era numbering: transpose functions at index 2 and N+3, so layers
  start at ``layer_03`` and the norm is ``layer_{N+4}``.
* ``STYLE=neox``          GPT-NeoX: ``layer_00`` embedding, index 1 a function, layers from
  ``layer_02`` (``attention.query_key_value``, ``mlp.linear1/2``), a function, ``norm.weight``,
  ``final_linear.weight`` when untied.

Env: MODE (save|load), STYLE, LAYERS, PP, TIED (1|0), BF16 (1|0), STAGE (ZeRO 0|1), SEED, OUT
(dump prefix), DIR (checkpoint dir to save to / load from), UNIVERSAL (1: load_universal),
TRAIN_STEPS, TOPO (model|plain: PipeModelDataParallelTopology or PipeDataParallelTopology),
VOCAB / HIDDEN (model size, default 64 / 16).

Writes ``OUT.pp<stage>`` (every parameter's fp32 master value and Adam moments, from stage's DP
rank 0) and ``OUT.json`` (global rank 0: eval loss on a fixed batch before and after training,
train losses, global_steps).
"""

import json
import math
import os

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import (
    PipeDataParallelTopology,
    PipeModelDataParallelTopology,
)
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from torch import nn

env = os.environ
STYLE, LAYERS, PP = env.get("STYLE", "megatron"), int(env["LAYERS"]), int(env.get("PP", "1"))
TIED, BF16, STAGE = env.get("TIED", "1") == "1", env.get("BF16", "0") == "1", int(env.get("STAGE", "1"))
VOCAB, HIDDEN = int(env.get("VOCAB", "64")), int(env.get("HIDDEN", "16"))
HEADS, SEQ, MICRO = 2, 8, 2


class Embedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(SEQ, HIDDEN)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.word_embeddings(ids) + self.position_embeddings(pos)


def tied_head(embedding, x):
    return x @ embedding.word_embeddings.weight.t()


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query_key_value = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.dense = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.query_key_value(x).view(b, s, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(out.transpose(1, 2).reshape(b, s, HIDDEN))


class MLP(nn.Module):
    def __init__(self, names):
        super().__init__()
        setattr(self, names[0], nn.Linear(HIDDEN, 4 * HIDDEN))
        setattr(self, names[1], nn.Linear(4 * HIDDEN, HIDDEN))
        self.names = names

    def forward(self, x):
        return getattr(self, self.names[1])(F.gelu(getattr(self, self.names[0])(x)))


class TransformerLayer(nn.Module):
    def __init__(self, neox):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(HIDDEN)
        self.attn_name = "attention" if neox else "self_attention"
        setattr(self, self.attn_name, Attention())
        self.post_attention_layernorm = nn.LayerNorm(HIDDEN)
        self.mlp = MLP(("linear1", "linear2") if neox else ("dense_h_to_4h", "dense_4h_to_h"))

    def forward(self, x):
        x = x + getattr(self, self.attn_name)(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class NormPipe(nn.Module):  # NeoX wraps its final norm: keys norm.weight / norm.bias
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, x):
        return self.norm(x)


class Head(nn.Module):
    def __init__(self, name):
        super().__init__()
        setattr(self, name, nn.Linear(HIDDEN, VOCAB, bias=False))
        self.name = name

    def forward(self, x):
        return getattr(self, self.name)(x)


def identity(x):
    return x


def specs():
    neox = STYLE == "neox"
    embed = (TiedLayerSpec("embed", Embedding, tied_weight_attr=["word_embeddings.weight"]) if TIED
             else LayerSpec(Embedding))
    head = (TiedLayerSpec("embed", Embedding, forward_fn=tied_head,
                          tied_weight_attr=["word_embeddings.weight"]) if TIED
            else LayerSpec(Head, "final_linear" if neox else "lm_head"))
    blocks = [LayerSpec(TransformerLayer, neox) for _ in range(LAYERS)]
    if neox:
        return [embed, identity, *blocks, identity, LayerSpec(NormPipe), head]
    if STYLE == "megatron_old":
        return [identity, embed, identity, *blocks, identity, LayerSpec(nn.LayerNorm, HIDDEN), head]
    assert STYLE == "megatron", STYLE
    return [identity, embed, *blocks, LayerSpec(nn.LayerNorm, HIDDEN), head]


def loss_fn(logits, labels):
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1))


def batches(seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
        yield ids, torch.roll(ids, -1, dims=1)


def dump_state(engine):
    """Every local parameter's fp32 master value and Adam moments, as stock DeepSpeed sees them."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._lazy_init_hp_params_optimizer_state()
    dump = {}
    for name, p in engine.module.named_parameters():
        dump[name] = {"fp32": safe_get_full_fp32_param(p).clone(),
                      "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
                      "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone(),
                      "lp": p.detach().float().clone()}
    grid = engine.grid
    if grid.get_data_parallel_id() == 0:
        torch.save(dump, f"{env['OUT']}.pp{grid.get_stage_id()}")
    return {name: values["lp"] for name, values in dump.items()}


def check_layer_files(engine, lp):
    """Load the layer files with stock ``PipelineModule.load_state_dir``: names of parameters whose
    value differs from what the universal optimizer state restored."""
    with open(os.path.join(env["DIR"], "latest_universal")) as f:
        tag = f.read().strip()
    engine.module.load_state_dir(os.path.join(env["DIR"], tag), engine.checkpoint_engine)
    return [n for n, p in engine.module.named_parameters() if not torch.equal(p.detach().float(), lp[n])]


def main():
    deepspeed.init_distributed("gloo")
    world = dist.get_world_size()
    topo_cls = PipeModelDataParallelTopology if env.get("TOPO", "model") == "model" else None
    if topo_cls is None:
        topo = PipeDataParallelTopology(num_pp=PP, num_dp=world // PP)
    else:
        topo = topo_cls(num_pp=PP, num_mp=1, num_dp=world // PP)
    torch.manual_seed(int(env.get("SEED", "1")))
    model = PipelineModule(layers=specs(), loss_fn=loss_fn, topology=topo,
                           partition_method="type:TransformerLayer", activation_checkpoint_interval=0)
    dp = world // PP
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 2,
              "train_batch_size": MICRO * 2 * dp, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": STAGE}, "bf16": {"enabled": BF16},
              "steps_per_print": 1000}
    if env.get("UNIVERSAL") == "1":
        config["checkpoint"] = {"load_universal": True}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           model_parameters=params)
    report = {}
    if env["MODE"] == "load":
        path, _ = engine.load_checkpoint(env["DIR"])
        assert path is not None, "DeepSpeed did not load the checkpoint"
        report["loaded_global_steps"] = engine.global_steps
        lp = dump_state(engine)
        if env.get("UNIVERSAL") == "1":
            report["layer_file_mismatches"] = check_layer_files(engine, lp)
        report["eval_before"] = float(engine.eval_batch(batches(7)))
    train = batches(int(env.get("SEED", "1")) + 100)
    report["train"] = [float(engine.train_batch(train)) for _ in range(int(env.get("TRAIN_STEPS", "0")))]
    assert all(math.isfinite(x) for x in report["train"]), report["train"]
    report["eval_after"] = float(engine.eval_batch(batches(7)))
    if env["MODE"] == "save":
        engine.save_checkpoint(env["DIR"], tag=f"global_step{engine.global_steps}")
        dump_state(engine)
    report["global_steps"] = engine.global_steps
    if dist.get_rank() == 0:
        with open(f"{env['OUT']}.json", "w") as f:
            json.dump(report, f)
    dist.barrier()


if __name__ == "__main__":
    main()
