"""Runs one multi-device check in its own process and prints its measurements as JSON.

``tests/test_parallel.py`` starts it with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
so that the virtual CPU devices (and float64, when asked) stay out of the rest of the suite.
It measures; the assertions live in the tests.

    python -m tests.parallel_worker equivalence --backend manual --dtypes float64 float32 \\
        --optimizer sgd --layouts data=8:replicated data=8:fsdp
    python -m tests.parallel_worker compiled --mesh data=8 --min-size 0
    python -m tests.parallel_worker save --mesh data=4 --path state.mgc
    python -m tests.parallel_worker resume --mesh data=8 --path state.mgc
    python -m tests.parallel_worker multihost --mesh data=8 --path state.mgc   # one per process
    python -m tests.parallel_worker ring --op --meshes data=2,seq=4 --causal 1 --T 48
    python -m tests.parallel_worker ring_memory --T 2048 --seqs 1 2 4 8
"""
from __future__ import annotations

import argparse
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import PartitionSpec as P

from manual_grad import GPTConfig, forward, init_params, loss_fn, parallel
from manual_grad.checkpoint import load_state, save_state
from manual_grad.layers.attention import attend_ref
from manual_grad.layers.ring_attention import ring_attend, ring_attend_ref, ring_order
from tests.helpers import rel_err

# A model whose every large dimension divides by 8 (V=64, T=8, C=32, F=128, 4 heads).
CONFIG = dict(vocab_size=64, block_size=8, n_layer=2, n_head=4, n_embd=32)
BATCH = 16
COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
ITEMSIZE = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
            "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}


def collective_bytes(hlo: str) -> dict[str, dict[str, int]]:
    """Per collective kind in compiled HLO text: how many ops, and the bytes of their results
    (for a tuple-shaped op, the sum over its elements)."""
    out = {c: {"count": 0, "bytes": 0} for c in COLLECTIVES}
    pattern = re.compile(r"=\s*(.*?)\s+(%s)(?:-start)?\(" % "|".join(COLLECTIVES))
    for line in hlo.splitlines():
        match = pattern.search(line)
        if match is None:
            continue
        kind = out[match.group(2)]
        kind["count"] += 1
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", match.group(1)):
            if dtype in ITEMSIZE:
                kind["bytes"] += ITEMSIZE[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return out


def optimizer(name: str) -> optax.GradientTransformation:
    """sgd: the update is linear in the gradient; adamw: two moments (see tests for "train")."""
    return {"sgd": optax.sgd(0.1, momentum=0.9), "adamw": optax.adamw(1e-3)}[name]


def make_step(cfg: GPTConfig, opt: optax.GradientTransformation, backend: str, *,
              report_updates: bool = False, mesh=None):
    """``(state, batch, key) -> (state, metrics)``: one optimizer step on ``loss_fn``; with
    ``report_updates`` the metrics also hold the optimizer's updates (new - old parameters,
    before rounding against the parameters)."""
    def step(state, batch, key):
        inputs, targets = batch
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], inputs, targets, cfg, backend,
                                                  dropout_key=key, mesh=mesh)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "updates": updates} if report_updates else {"loss": loss}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics
    return step


def init_state(cfg: GPTConfig, opt: optax.GradientTransformation, seed: int = 0):
    params = init_params(cfg, jax.random.key(seed))
    return {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}


def make_batch(cfg: GPTConfig, seed: int):
    inputs = jax.random.randint(jax.random.key(seed), (BATCH, cfg.block_size), 0, cfg.vocab_size)
    targets = jnp.roll(inputs, -1, axis=1).at[:, -1].set(-100)
    return np.asarray(inputs), np.asarray(targets)


def worst(tree_a, tree_b) -> tuple[float, str]:
    """(largest per-array relative error, its path) over the floating arrays of two pytrees."""
    errors = [(rel_err(a, b), jax.tree_util.keystr(path))
              for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree_a), jax.tree.leaves(tree_b))
              if jnp.issubdtype(np.asarray(b).dtype, jnp.floating)]
    return max(errors)


def layout(text: str):
    """'data=4,model=2:fsdp' -> (mesh, mode)."""
    spec, _, mode = text.partition(":")
    return parallel.make_mesh(spec), mode or "replicated"


def sharded_run(step, state, batch, key, mesh, mode, **rules):
    """(compiled step, new state, metrics) of one step on ``mesh`` in ``mode``."""
    shardings = parallel.state_shardings(state, mesh, mode, **rules)
    jitted = parallel.jit_sharded_step(step, shardings, mesh, donate=False)
    sharded_state = parallel.shard_state(state, shardings)
    sharded_batch = parallel.shard_batch(batch, mesh)
    compiled = jitted.lower(sharded_state, sharded_batch, key).compile()
    new_state, metrics = compiled(sharded_state, sharded_batch, key)
    return compiled, new_state, metrics


def cmd_equivalence(args) -> dict:
    """One step on one device vs the same step on each layout, per dtype: loss, the
    optimizer's updates, the new parameters and the new optimizer state, as relative errors
    (the largest over the arrays, with its path)."""
    out = {}
    for dtype in args.dtypes:
        cfg = GPTConfig(**CONFIG, dtype=dtype, dropout=args.dropout, backward=args.backward)
        if args.optimizer == "train":   # the project's own step: clipping + AdamW + schedule
            from manual_grad.training import TrainConfig, make_optimizer, make_train_step
            opt = make_optimizer(TrainConfig().optim)
            step = make_train_step(cfg, opt, args.backend)
        else:
            opt = optimizer(args.optimizer)
            step = make_step(cfg, opt, args.backend, report_updates=True)
        state, batch, key = init_state(cfg, opt), make_batch(cfg, 1), jax.random.key(2)
        ref_state, ref_metrics = jax.jit(step)(state, batch, key)
        for text in args.layouts:
            mesh, mode = layout(text)
            _, new_state, metrics = sharded_run(step, state, batch, key, mesh, mode)
            out[f"{dtype}/{text}"] = {
                "dtype": str(new_state["params"]["wte"].dtype),
                "loss": rel_err(metrics["loss"], ref_metrics["loss"]),
                "metrics": worst(metrics, ref_metrics),   # loss, updates or grad_norm
                "params": worst(new_state["params"], ref_state["params"]),
                "opt_state": worst(new_state["opt_state"], ref_state["opt_state"]),
                "specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(new_state)}),
            }
    return out


def cmd_compiled(args) -> dict:
    """Collectives in the compiled HLO and per-device argument bytes, replicated vs FSDP. One
    block: the HLO holds the scanned blocks' collectives once, whatever the number of layers."""
    cfg = GPTConfig(**{**CONFIG, "n_layer": 1}, backward=args.backward)
    opt = optimizer("adamw")
    step = make_step(cfg, opt, args.backend)
    state, batch, key = init_state(cfg, opt), make_batch(cfg, 1), jax.random.key(2)
    mesh = parallel.make_mesh(args.mesh)
    out = {"devices": mesh.size, "state_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
           "param_bytes": sum(x.nbytes for x in jax.tree.leaves(state["params"])),
           "block_param_bytes": sum(x.nbytes for x in jax.tree.leaves(state["params"]["blocks"]))}
    try:
        parallel.shard_batch(np.zeros((mesh.size + 1, cfg.block_size), np.int32), mesh)
        out["indivisible_batch_error"] = ""
    except ValueError as e:
        out["indivisible_batch_error"] = str(e)
    for mode in parallel.MODES:
        compiled, new_state, _ = sharded_run(step, state, batch, key, mesh, mode, min_size=args.min_size)
        hlo = compiled.as_text()
        memory = compiled.memory_analysis()
        device = mesh.devices.flat[0]
        out[mode] = {
            "collectives": collective_bytes(hlo),
            "argument_bytes": int(memory.argument_size_in_bytes),
            # what the state's shards on one device weigh, from the arrays themselves
            "state_bytes_on_device": sum(s.data.nbytes for x in jax.tree.leaves(new_state)
                                         for s in x.addressable_shards if s.device == device),
        }
    return out


def next_loss(step, state, batch, key) -> float:
    """The loss the step reports from ``state`` (the loss before its update)."""
    return float(step(state, batch, key)[1]["loss"])


def total(state) -> float:
    """Sum of |x| over the whole state in float64: equal only for equal arrays, in practice."""
    return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(state)))


def cmd_save(args) -> dict:
    """Trains one step on ``--mesh`` (FSDP), saves, and reports the next step's loss."""
    cfg, opt = GPTConfig(**CONFIG), optimizer("adamw")
    mesh = parallel.make_mesh(args.mesh)
    step = make_step(cfg, opt, "manual", mesh=mesh)   # a seq axis: ring attention
    shardings = parallel.state_shardings(init_state(cfg, opt), mesh, "fsdp")
    jitted = parallel.jit_sharded_step(step, shardings, mesh)
    state = parallel.shard_state(init_state(cfg, opt), shardings)
    state, _ = jitted(state, parallel.shard_batch(make_batch(cfg, 1), mesh), jax.random.key(2))
    save_state(args.path, state=state)
    checksum = total(state)
    loss = next_loss(jitted, state, parallel.shard_batch(make_batch(cfg, 3), mesh), jax.random.key(4))
    return {"devices": mesh.size, "next_loss": loss, "checksum": checksum}


def cmd_resume(args) -> dict:
    """Loads the checkpoint onto ``--mesh`` (FSDP), or onto one device without a mesh when
    ``--mesh none``, and reports the next step's loss."""
    cfg, opt = GPTConfig(**CONFIG), optimizer("adamw")
    step = make_step(cfg, opt, "manual")
    like = jax.eval_shape(lambda: init_state(cfg, opt))
    batch, key = make_batch(cfg, 3), jax.random.key(4)
    if args.mesh == "none":
        state = load_state(args.path, like)
        jitted, devices = jax.jit(step), 1
    else:
        mesh = parallel.make_mesh(args.mesh)
        shardings = parallel.state_shardings(like, mesh, "fsdp")
        state = load_state(args.path, like, shardings)
        jitted, batch, devices = parallel.jit_sharded_step(step, shardings, mesh), parallel.shard_batch(batch, mesh), mesh.size
    checksum, step_count = total(state), int(state["step"])
    on_devices = len(state["params"]["wte"].sharding.device_set)
    loss = next_loss(jitted, state, batch, key)
    return {"devices": devices, "next_loss": loss, "checksum": checksum,
            "step": step_count, "state_on_devices": on_devices}


def cmd_multihost(args) -> dict:
    """One process of a multi-host run: each process feeds its own rows of the batch to an FSDP
    step on the global mesh, compared with the whole batch's step on this process's first
    device; then a checkpoint that process 0 alone writes."""
    started = parallel.initialize_distributed()
    cfg, opt = GPTConfig(**CONFIG), optimizer("sgd")
    step = make_step(cfg, opt, "manual")
    state, batch, key = init_state(cfg, opt), make_batch(cfg, 1), jax.random.key(2)
    ref_state, ref_metrics = jax.jit(step)(jax.device_put(state, jax.local_devices()[0]), batch, key)
    mesh = parallel.make_mesh(args.mesh)
    shardings = parallel.state_shardings(state, mesh, "fsdp")
    jitted = parallel.jit_sharded_step(step, shardings, mesh, donate=False)
    rows = BATCH // jax.process_count()
    mine = jax.tree.map(lambda x: x[jax.process_index() * rows:(jax.process_index() + 1) * rows], batch)
    sharded_state = parallel.shard_state(state, shardings)
    new_state, metrics = jitted(sharded_state, parallel.shard_batch(mine, mesh), key)
    # the same step fed the whole batch on every process
    whole_state, _ = jitted(sharded_state, parallel.shard_batch(batch, mesh, process_local=False), key)
    save_state(args.path, state=new_state)
    host = parallel.gather_to_host(new_state)
    update = jax.tree.map(np.subtract, host["params"], jax.device_get(state["params"]))
    ref_update = jax.tree.map(np.subtract, jax.device_get(ref_state["params"]), jax.device_get(state["params"]))
    return {"started": started, "process": jax.process_index(), "processes": jax.process_count(),
            "devices": mesh.size, "local_devices": jax.local_device_count(),
            "loss": rel_err(multihost_loss(metrics), ref_metrics["loss"]),
            "update": worst(update, ref_update),
            "whole_batch_same": bool(all(np.array_equal(a, b) for a, b in zip(
                jax.tree.leaves(host), jax.tree.leaves(parallel.gather_to_host(whole_state)))))}


def multihost_loss(metrics) -> float:
    return float(np.asarray(parallel.gather_to_host(metrics)["loss"]))


# --- ring attention (a seq axis) ------------------------------------------------------------

RING_CONFIG = dict(vocab_size=64, block_size=48, n_layer=2, n_head=4, n_embd=32, attn_block_size=4)


def ring_batch(B: int, T: int, seed: int = 1):
    """(inputs, targets) (B, T); some targets ignored, a whole quarter of the first row among them."""
    inputs = jax.random.randint(jax.random.key(seed), (B, T), 0, RING_CONFIG["vocab_size"])
    targets = jnp.roll(inputs, -1, axis=1).at[:, -1].set(-100).at[0, :T // 4].set(-100)
    return np.asarray(inputs), np.asarray(targets)


def ring_op_errors(n: int, causal: bool, T: int) -> dict:
    """The op on a ring of n devices against its twin (which gathers K/V) and against plain
    attention in the natural order: outputs and the gradients of sum(out * g) wrt q, k, v."""
    mesh = parallel.make_mesh(f"data=1,seq={n}")
    spec = P(None, None, "seq", None)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(key, (2, 2, T, 4), jnp.float64) for key in keys)

    def on_ring(op):
        attend = jax.shard_map(lambda q, k, v: op(q, k, v, causal=causal, axis="seq", n=n, tile=4), mesh=mesh,
                               in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * g), (0, 1, 2)))

    order = ring_order(T, n, causal)
    natural = np.argsort(order)
    plain = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend_ref(
        *(a[..., natural, :] for a in (q, k, v)), causal=causal)[..., order, :] * g), (0, 1, 2)))
    ring, twin, ref = on_ring(ring_attend)(q, k, v), on_ring(ring_attend_ref)(q, k, v), plain(q, k, v)
    return {"twin": worst(ring, twin)[0], "plain": worst(ring, ref)[0]}


def ring_model_errors(spec: str, causal: bool, T: int, with_forward: bool) -> dict:
    """float64 loss and every gradient of loss_fn on ``spec`` (state placed by the tensor-parallel
    rules) against one device; the step's collectives and its all-gathers' result shapes."""
    cfg = GPTConfig(**RING_CONFIG, dtype="float64", causal=causal)
    params, (inputs, targets) = init_params(cfg, jax.random.key(0)), ring_batch(4, T)
    ref = jax.jit(jax.value_and_grad(lambda p, i, t: loss_fn(p, i, t, cfg)))(params, inputs, targets)
    mesh = parallel.make_mesh(spec)
    placed = parallel.shard_state(params, parallel.state_shardings(params, mesh))
    batch = parallel.shard_batch((inputs, targets), mesh)
    step = jax.jit(jax.value_and_grad(lambda p, i, t: loss_fn(p, i, t, cfg, mesh=mesh)))
    compiled = step.lower(placed, *batch).compile()
    got = compiled(placed, *batch)
    hlo = compiled.as_text()
    gathers = re.findall(r"=\s*(\S+)\s+all-gather(?:-start)?\(", hlo)
    out = {"loss": rel_err(got[0], ref[0]), "grads": worst(got[1], ref[1]),
           "collectives": collective_bytes(hlo), "all_gather_shapes": gathers}
    if with_forward:
        logits = jax.jit(lambda p, i: forward(p, i, cfg, mesh=mesh))(placed, batch[0])
        out["logits"] = rel_err(logits, forward(params, inputs, cfg))
    return out


def cmd_ring(args) -> dict:
    """Ring attention checks at tiny sizes in one process: the op (``--op``), then the model's
    loss and gradients on each of ``--meshes``, and the error of a T the ring cannot split."""
    out = {}
    if args.op:
        out["op"] = {f"causal={c}": ring_op_errors(args.op_seq, c, T) for c, T in ((True, 48), (False, 24))}
    for spec in args.meshes:
        out[spec] = ring_model_errors(spec, bool(args.causal), args.T, args.forward)
    cfg = GPTConfig(**RING_CONFIG, dtype="float64")
    try:
        inputs, targets = ring_batch(4, 20)
        jax.eval_shape(lambda p: loss_fn(p, inputs, targets, cfg, mesh=parallel.make_mesh("data=2,seq=4")),
                       init_params(cfg, jax.random.key(0)))
        out["odd_error"] = ""
    except ValueError as e:
        out["odd_error"] = str(e)
    return out


def cmd_ring_memory(args) -> dict:
    """Per-device temporary memory (``memory_analysis``) of one float32 value-and-grad of a
    2-layer C=64 model at ``--T`` on meshes data=1,seq=s (s=1: one device, no ring)."""
    cfg = GPTConfig(vocab_size=64, block_size=args.T, n_layer=2, n_head=4, n_embd=64)
    params, (inputs, targets) = init_params(cfg, jax.random.key(0)), ring_batch(1, args.T)
    out = {}
    for n in args.seqs:
        mesh = None if n == 1 else parallel.make_mesh(f"data=1,seq={n}")
        step = jax.jit(jax.value_and_grad(lambda p, i, t: loss_fn(p, i, t, cfg, mesh=mesh)))
        memory = step.lower(params, inputs, targets).compile().memory_analysis()
        out[str(n)] = int(memory.temp_size_in_bytes)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("equivalence")
    p.add_argument("--backend", default="manual")
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw", "train"],
                   help="train: manual_grad.training.make_train_step with its optimizer")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--backward", default=GPTConfig.backward, help="manual backend's variant")
    p.add_argument("--layouts", nargs="+", default=["data=8:replicated", "data=8:fsdp"])
    p = sub.add_parser("compiled")
    p.add_argument("--mesh", default="data=8")
    p.add_argument("--backend", default="manual")
    p.add_argument("--min-size", type=int, default=parallel.FSDP_MIN_SIZE)
    p.add_argument("--backward", default=GPTConfig.backward, help="manual backend's variant")
    p = sub.add_parser("ring")
    p.add_argument("--op", action="store_true", help="also check the op on a ring of --op-seq devices")
    p.add_argument("--op-seq", type=int, default=8)
    p.add_argument("--meshes", nargs="*", default=[])
    p.add_argument("--causal", type=int, default=1)
    p.add_argument("--T", type=int, default=48)
    p.add_argument("--forward", action="store_true", help="also compare forward's logits")
    p = sub.add_parser("ring_memory")
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--seqs", type=int, nargs="+", default=[1, 2, 4, 8])
    for name in ("save", "resume", "multihost"):
        p = sub.add_parser(name)
        p.add_argument("--mesh", required=True)
        p.add_argument("--path", required=True)
    args = parser.parse_args(argv)
    if "float64" in getattr(args, "dtypes", ()) or args.command == "ring":
        jax.config.update("jax_enable_x64", True)
    result = globals()[f"cmd_{args.command}"](args)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
