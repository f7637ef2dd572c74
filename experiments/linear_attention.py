"""Experiment 3 (open question 3): the backward of linear (kernelised) attention, index-free.

The formulas are in :mod:`manual_grad.layers.linear_attention` (quadratic form for the
derivation, prefix sums for the O(T·D²) causal evaluation). Here: (a) the hand-written
prefix-sum backward against autodiff of the quadratic masked form, float64, causal and not,
normalised and not; (b) forward + backward time of one attention layer as T grows: softmax
attention with the paper's backward (saves ρ), with the lean (flash) backward of the XLA path and
with the C++ kernel (the model's default on a CPU), linear attention with the hand-written
backward, and the quadratic linear form differentiated by autodiff.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from manual_grad.kernels import cpu_attention, cpu_attention_available
from manual_grad.layers.attention import attention
from manual_grad.layers.attention_variants import attention_variant, attention_variant_ref
from manual_grad.layers.linear_attention import linear_attend, linear_attend_ref
from experiments.common import new_figure, parse_args, plot_lines, save_figure, time_call, write_result

NAME = "linear_attention"


def gradient_errors(shape, key):
    """{setting: max over dq, dk, dv of ||manual - autodiff|| / ||autodiff||} in float64."""
    kq, kk, kv, kc = jax.random.split(key, 4)
    q, k, v = (jax.random.normal(kx, shape) for kx in (kq, kk, kv))
    ct = jax.random.normal(kc, shape)
    errors = {}
    for causal in (True, False):
        for normalise in (True, False):
            settings = dict(causal=causal, normalise=normalise)
            y, vjp = jax.vjp(lambda *a: linear_attend(*a, **settings), q, k, v)
            y_ref, vjp_ref = jax.vjp(lambda *a: linear_attend_ref(*a, **settings), q, k, v)
            errs = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(vjp(ct), vjp_ref(ct))]
            errors[f"causal={causal}, normalise={normalise}"] = {
                "forward": float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref)), "gradients": max(errs)}
    return errors


def timings(lengths, B, C, n_head, repeats):
    """{T: seconds of one jitted forward + backward (gradients of all inputs)} per method."""
    methods = {
        "softmax (manual)": lambda *a: attention_variant(*a, n_head=n_head, kind="softmax"),
        "softmax, lean (manual)": lambda *a: attention(*a, {}, n_head=n_head, backward="lean", tile=128),
        "linear, prefix sums (manual)": lambda *a: attention_variant(*a, n_head=n_head, kind="linear"),
        "linear, quadratic form (autodiff)": lambda *a: attention_variant_ref(*a, n_head=n_head, kind="linear"),
    }
    if cpu_attention_available("float32"):
        methods["softmax, C++ kernel (manual)"] = lambda *a: attention(*a, {}, n_head=n_head, backward="lean",
                                                                       core=cpu_attention)
    out = {name: {} for name in methods}
    for T in lengths:
        k = jax.random.split(jax.random.key(T), 6)
        args = (jax.random.normal(k[0], (B, T, C)), 0.1 * jax.random.normal(k[1], (C, 3 * C)),
                jnp.zeros(3 * C), 0.1 * jax.random.normal(k[2], (C, C)), jnp.zeros(C))
        ct = jax.random.normal(k[3], (B, T, C))
        for name, f in methods.items():
            step = jax.jit(lambda args, ct, f=f: jax.vjp(f, *args)[1](ct))
            out[name][T] = time_call(step, args, ct, repeats=repeats)
    return out


def main(argv=None):
    args = parse_args(__doc__, argv)
    jax.config.update("jax_enable_x64", True)
    errors = gradient_errors((2, 3, 8 if args.quick else 64, 16), jax.random.key(0))
    jax.config.update("jax_enable_x64", False)
    lengths = (16, 32) if args.quick else (128, 256, 512, 1024, 2048, 4096)
    B, C, H = (1, 16, 2) if args.quick else (1, 64, 4)
    times = timings(lengths, B, C, H, repeats=2 if args.quick else 5)
    worst = max(e["gradients"] for e in errors.values())
    lin = times["linear, prefix sums (manual)"]
    softmaxes = [name for name in times if name.startswith("softmax")]
    fastest = {T: min(times[name][T] for name in softmaxes) for T in lengths}     # the best softmax at each T
    crossover = {name: next((T for T in lengths if lin[T] < times[name][T]), None) for name in softmaxes}
    verdict = (f"prefix-sum backward matches autodiff of the quadratic form to {worst:.1e} (float64); "
               f"time ratio linear / fastest softmax goes from {lin[lengths[0]] / fastest[lengths[0]]:.2f} at "
               f"T={lengths[0]} to {lin[lengths[-1]] / fastest[lengths[-1]]:.2f} at T={lengths[-1]}; linear is "
               f"faster from T = {crossover}")
    fig, (ax,) = new_figure()
    plot_lines(ax, {name: (lengths, [t[T] * 1e3 for T in lengths]) for name, t in times.items()}, xlabel="T",
               ylabel="forward + backward, ms", title=f"one layer, B={B}, C={C}, {H} heads, causal",
               logx=2, logy=True, style="o-")
    plot = save_figure(fig, args.out, NAME)
    path = write_result(args.out, NAME, {"gradient_rel_error_float64": errors, "timing_seconds": times,
                                         "timing_setup": {"B": B, "C": C, "n_head": H, "dtype": "float32",
                                                          "causal": True},
                                         "linear_faster_from_T": crossover, "fastest_softmax_seconds": fastest, "verdict": verdict, "plot": plot},
                        args.quick)
    print(verdict)
    print(path)


if __name__ == "__main__":
    main()
