"""Experiment 8: the worked encoder-decoder example of seeds/003 rebuilt with the library's layers.

Every value the example prints is recomputed in float64 from the example's own inputs with the
library's ops (``logits_loss`` for the vocabulary projection and cross-entropy, ``linear`` and
``relu`` for the FFN, the attention core and ``cross_attention`` for the cross-attention,
``attention`` for the one-token self-attention, ``layernorm`` for the LayerNorm formulas), and
classified:

* right: equal to the exact value at the printed precision;
* follows from its printed inputs: the arithmetic of the step is right, but an input it used
  was rounded or wrong, so the value differs from the exact one (given);
* wrong: matches neither (the correct value is given);
* not reproducible: the example does not give what the value needs (said why).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad.layers.attention import attend_bwd, attend_fwd, attention
from manual_grad.layers.cross_attention import cross_attention
from manual_grad.layers.layernorm import layernorm
from manual_grad.layers.linear import linear
from manual_grad.layers.loss import logits_loss, logits_ref
from manual_grad.layers.mlp import relu
from experiments.common import parse_args, write_result

NAME = "worked_example"

# The example's inputs, as printed.
Z = [1.07006, 0.95765]                                   # decoder output for the token "Le"
W_VOCAB = [[0.8, 0.2], [0.1, 0.5], [-0.2, 0.4]]          # (V=3, d=2): logits = z W_vocab^T
TARGET = 1                                               # "chat"
X_FFN = [0.5, 0.5]
Z1 = [0.4, 0.1, 0.35, -0.05]                             # printed x W1 (W1 itself is not given)
DA1 = [0.146, 0.001, 0.207, -0.162]                      # printed dL/da1 (W2 is not given)
QD = [1.204, 0.895]
K = [[4.689, 1.905], [4.818, 2.409]]                     # K1, K2; the example also uses them as V1, V2
ALPHA_PRINTED = [0.507, 0.493]
DZ_PRINTED = [0.281, -0.167]
X_SELF = [0.5, 0.5]
WK_SELF = [[1.0, 0.0], [1.0, 1.0]]
WV_SELF = [[1.0, 1.0], [1.0, 1.0]]


def decimals(value) -> int:
    """Decimal places of a printed number (as written in the example)."""
    text = repr(float(value))
    return 0 if "." not in text or text.endswith(".0") else len(text.split(".")[1])


def matches(printed, value, places=None, units=0.5) -> bool:
    """Printed equals value to within ``units`` of the last printed place (0.5: correctly rounded)."""
    p, v = np.ravel(np.asarray(printed, float)), np.ravel(np.asarray(value, float))
    if p.shape != v.shape:
        return False
    tol = [units * 10.0 ** -(places if places is not None else max(decimals(x), 1)) + 1e-12 for x in p]
    return bool(np.all(np.abs(p - v) <= tol))


LAST_DIGIT = "last digit off (rounding)"


def classify(printed, exact, from_inputs=None, places=None):
    """"right" (correctly rounded), "follows from its printed inputs", LAST_DIGIT (within one unit
    of the last printed place: truncated or rounded from a rounded input, not a formula error), or
    "wrong" (off by more than a unit in the last place)."""
    if matches(printed, exact, places):
        return "right"
    if from_inputs is not None and matches(printed, from_inputs, places):
        return "follows from its printed inputs"
    if matches(printed, exact, places, units=1.0):
        return LAST_DIGIT
    return "wrong"


def _r(x, n=4):
    return np.round(np.asarray(x, float), n).tolist()


def decoder_projection(rows):
    z, w = jnp.asarray([[Z]]), jnp.asarray(W_VOCAB)                 # (1, 1, 2), (3, 2)
    targets = jnp.asarray([[TARGET]])
    logits = logits_ref(z, w, None, {}, tied=True)[0, 0]
    loss, (dz, dw) = jax.value_and_grad(lambda z, w: logits_loss(z, w, None, targets, {}, tied=True),
                                        argnums=(0, 1))(z, w)
    probs = jax.nn.softmax(logits)
    dlogits = probs - jax.nn.one_hot(TARGET, 3, dtype=probs.dtype)
    add = rows.append
    add(dict(section="projection", quantity="logits = z W_vocab^T", printed=[1.0476, 0.5858, 0.1690],
             correct=_r(logits), verdict=classify([1.0476, 0.5858, 0.1690], logits)))
    add(dict(section="projection", quantity="softmax ŷ", printed=[1.0476, 0.5858, 0.1690], correct=_r(probs),
             verdict=classify([1.0476, 0.5858, 0.1690], probs),
             note="the example prints the logits again as the softmax"))
    from_printed = -math.log(0.308)
    add(dict(section="projection", quantity="loss = -log(0.308)", printed=1.176, correct=round(float(loss), 4),
             verdict=classify(1.176, loss, from_printed),
             note=f"-log(0.308) itself is {from_printed:.4f}; the exact loss is -log({float(probs[1]):.5f})"))
    add(dict(section="projection", quantity="dL/dlogits = ŷ - y", printed=[0.489, -0.692, 0.203],
             correct=_r(dlogits), verdict=classify([0.489, -0.692, 0.203], dlogits)))
    printed_dw = [[0.523, -0.741, 0.217], [0.468, -0.662, 0.194]]
    dw_from_printed = np.outer(Z, [0.489, -0.692, 0.203])
    add(dict(section="projection", quantity="dL/dW_vocab (printed as its transpose, 2 x 3)", printed=printed_dw,
             correct=_r(dw.T), verdict=classify(printed_dw, dw.T, dw_from_printed),
             note="the gradient of the (3 x 2) W_vocab is dlogits^T z (3 x 2); the example prints z^T dlogits"))
    formula_value = np.asarray([1.0476, 0.5858, 0.1690]) @ np.asarray(W_VOCAB)
    add(dict(section="projection", quantity="dL/dz = dlogits W_vocab", printed=DZ_PRINTED,
             correct=_r(dz[0, 0]), verdict=classify(DZ_PRINTED, dz[0, 0]),
             note=f"the value is right, but the expression printed multiplies the logits, not dL/dlogits: "
                  f"that product is {_r(formula_value)}"))
    return np.asarray(dz[0, 0])


def decoder_ffn(rows, dz_exact):
    add = rows.append
    add(dict(section="decoder FFN", quantity="z1 = x W1", printed=Z1, correct=None, verdict="not reproducible",
             note="W1 is never given (any W1 whose column sums are [0.8, 0.2, 0.7, -0.1] gives it)"))
    z1 = jnp.asarray(Z1)
    a1, relu_vjp = jax.vjp(relu, z1)
    add(dict(section="decoder FFN", quantity="a1 = ReLU(z1)", printed=[0.4, 0.1, 0.35, 0.0], correct=_r(a1),
             verdict=classify([0.4, 0.1, 0.35, 0.0], a1)))
    add(dict(section="decoder FFN", quantity="z2 = a1 W2 = z", printed=Z, correct=None, verdict="not reproducible",
             note="W2 (4 x 2) is never given"))
    # dW2 = a1^T dL/dz, the linear layer's weight gradient (its value does not involve W2 itself).
    dw2 = lambda dz: jax.vjp(lambda w: linear(a1[None], w, None), jnp.zeros((4, 2)))[1](jnp.asarray(dz)[None])[0]
    printed_dw2 = [[0.1124, -0.0668], [0.0281, -0.0167], [0.0984, -0.0585], [0.0, 0.0]]
    add(dict(section="decoder FFN", quantity="dL/dW2 = a1^T dL/dz", printed=printed_dw2, correct=_r(dw2(dz_exact)),
             verdict=classify(printed_dw2, dw2(dz_exact), dw2(DZ_PRINTED)),
             note="computed from dL/dz rounded to 3 decimals"))
    shown = np.asarray([[0.4, 0.1], [0.1, 0.35], [-0.2, 0.4]])
    add(dict(section="decoder FFN", quantity="dL/da1 = dL/dz W2^T", printed=DA1, correct=None,
             verdict="not reproducible",
             note=f"W2 is not given and the matrix shown is 3 x 2, which cannot be W2^T (2 x 4); reading its rows "
                  f"as rows of W2 gives {_r(shown @ np.asarray(DZ_PRINTED))}, none of the printed values"))
    dz1 = relu_vjp(jnp.asarray(DA1))[0]
    add(dict(section="decoder FFN", quantity="dL/dz1 = dL/da1 ∘ ReLU'(z1)", printed=[0.146, 0.001, 0.207, 0.0],
             correct=_r(dz1), verdict=classify([0.146, 0.001, 0.207, 0.0], dz1),
             note="given the printed dL/da1"))
    dw1 = jax.vjp(lambda w: linear(jnp.asarray([X_FFN]), w, None), jnp.zeros((2, 4)))[1](dz1[None])[0]
    printed_dw1 = [[0.073, 0.0005, 0.1035, 0.0]] * 2
    add(dict(section="decoder FFN", quantity="dL/dW1 = x^T dL/dz1", printed=printed_dw1, correct=_r(dw1),
             verdict=classify(printed_dw1, dw1), note="given the printed dL/dz1"))


def cross_attention_step(rows, dz_exact):
    add = rows.append
    qd, k = jnp.asarray(QD)[None, None, None], jnp.asarray(K)[None, None]   # (1, 1, 1, 2), (1, 1, 2, 2)
    out, probs = attend_fwd(qd, k, k, causal=False)                             # V = K, as the example uses
    alpha = probs[0, 0, 0]
    alpha_unscaled = jax.nn.softmax(jnp.asarray(K) @ jnp.asarray(QD))
    add(dict(section="cross-attention", quantity="α = softmax(Qd K^T / sqrt(2))", printed=ALPHA_PRINTED,
             correct=_r(alpha), verdict=classify(ALPHA_PRINTED, alpha),
             note=f"without the 1/sqrt(d) scale α = {_r(alpha_unscaled)}; either way α2 > α1 since Qd·K2 > Qd·K1"))
    o_from_printed = np.asarray(ALPHA_PRINTED) @ np.asarray(K)
    add(dict(section="cross-attention", quantity="o = α1 V1 + α2 V2", printed=[5.0918, 2.3458],
             correct=_r(out[0, 0, 0]), verdict=classify([5.0918, 2.3458], out[0, 0, 0], o_from_printed),
             note=f"V is not given; the example's later steps use V_i = K_i (assumed here); with its own α that "
                  f"gives {_r(o_from_printed)}. 5.0918 > max(4.689, 4.818) cannot be a convex combination of them"))
    add(dict(section="cross-attention", quantity="dL/do (the FFN's dL/dz reused)", printed=DZ_PRINTED, correct=None,
             verdict="not reproducible",
             note="the gradient at the cross-attention output is dL/dx of the FFN (dz1 W1^T, plus the residual "
                  "if any), which needs W1; the example reuses dL/dz. The rows below take dL/do as printed"))
    dout = jnp.asarray(DZ_PRINTED)[None, None, None]
    dq, dk, dv = attend_bwd(qd, k, k, probs, dout)
    printed_alpha = jnp.asarray(ALPHA_PRINTED)
    for i, printed in enumerate(([0.1425, -0.0847], [0.1385, -0.0823])):
        add(dict(section="cross-attention", quantity=f"dL/dV{i + 1} = α{i + 1} dL/do", printed=printed,
                 correct=_r(dv[0, 0, i]), verdict=classify(printed, dv[0, 0, i], printed_alpha[i] * dout[0, 0, 0]),
                 note="with the printed (wrong) α"))
    dalpha = (dout @ k.swapaxes(-1, -2))[0, 0, 0]                                # G = Δ V^T
    for i, printed in enumerate((0.9994, 0.9515)):
        from_printed = float(np.asarray(DZ_PRINTED) @ np.asarray(K[i]))
        add(dict(section="cross-attention", quantity=f"dL/dα{i + 1} = dL/do · V{i + 1}", printed=printed,
                 correct=round(float(dalpha[i]), 4), verdict=classify(printed, dalpha[i], from_printed),
                 note=f"{from_printed:.6f} rounds to {from_printed:.4f}: the example truncates"))
    for i, printed in enumerate((1.318, 1.26)):
        add(dict(section="cross-attention", quantity=f"dL/dK{i + 1} (encoder section)", printed=printed,
                 correct=_r(dk[0, 0, i]), verdict="wrong",
                 note=f"the expression printed is dL/dα{i + 1} (= {float(dalpha[i]):.4f}), and the number is not even "
                      f"that; dL/dK_i = (dL/ds_i) Qd / sqrt(d) is a vector"))
    ds = ((dalpha - (dalpha * alpha).sum()) * alpha)
    add(dict(section="cross-attention", quantity="dL/ds (softmax Jacobian; formula only)", printed=None,
             correct=_r(ds, 5), verdict="right (formula); value not printed"))
    wrong_dq = np.asarray(dalpha) @ np.asarray(K)
    add(dict(section="cross-attention", quantity="dL/dQ = Σ dL/dα_i K_i (formula)", printed=None,
             correct=_r(dq[0, 0, 0]), verdict="wrong (formula)",
             note=f"skips the softmax Jacobian and the 1/sqrt(d); that formula gives {_r(wrong_dq)}"))
    # The same step through the library's cross-attention layer (identity projections, V = K):
    eye = jnp.eye(2)
    y, vjp = jax.vjp(lambda ctx, x: cross_attention(x, ctx, eye, None, jnp.concatenate([eye, eye], 1), None, eye,
                                                    None, n_head=1), k[0], qd[0])
    dctx, dx = vjp(dout[0])
    consistent = bool(np.allclose(y, out[0]) and np.allclose(dctx, dk[0] + dv[0])
                      and np.allclose(dx, dq[0]))
    return consistent


def self_attention_step(rows):
    x = jnp.asarray([[X_SELF]])                                                 # (1, T=1, 2)
    w_qkv = jnp.concatenate([jnp.eye(2), jnp.asarray(WK_SELF), jnp.asarray(WV_SELF)], 1)
    y, vjp = jax.vjp(lambda w: attention(x, w, None, jnp.eye(2), None, {}, n_head=1), w_qkv)
    dw = vjp(jnp.asarray([[DZ_PRINTED]]))[0]
    rows.append(dict(section="decoder self-attention", quantity="output = v = x Wv (one token: weight 1)",
                     printed="v", correct=_r(y[0, 0]), verdict="right"))
    rows.append(dict(section="decoder self-attention", quantity="dL/dWv = x^T d_out (expression only)",
                     printed=None, correct=_r(dw[:, 4:]), verdict="right (formula); value not printed",
                     note=f"dL/dWq and dL/dWk are exactly {float(jnp.abs(dw[:, :4]).max()):g}: one token's scores "
                          f"cannot change its single attention weight"))


def encoder_and_layernorm(rows):
    add = rows.append
    add(dict(section="encoder FFN", quantity="z1 = x W1 with x = [1, 1]", printed=[0.88, 0.22, 0.77, -0.11],
             correct=None, verdict="not reproducible",
             note="the encoder's W1 is not given; the decoder's W1 would give 2 x [0.4, 0.1, 0.35, -0.05] = "
                  "[0.8, 0.2, 0.7, -0.1], not this (1.1 times that)"))
    a1 = relu(jnp.asarray([0.88, 0.22, 0.77, -0.11]))
    add(dict(section="encoder FFN", quantity="a1 = ReLU(z1)", printed=[0.88, 0.22, 0.77, 0.0], correct=_r(a1),
             verdict=classify([0.88, 0.22, 0.77, 0.0], a1)))
    add(dict(section="encoder FFN", quantity="dL/dz2 = [0.281, -0.167]", printed=DZ_PRINTED, correct=None,
             verdict="not reproducible",
             note="the decoder's dL/dz reused; the encoder's FFN output reaches the loss only through the "
                  "cross-attention's keys and values (dL/dK, dL/dV above), and the encoder's weights are not given"))
    # LayerNorm: the example's formulas against the library's, on x = z, δ = dL/dz, γ = 1, β = 0, eps = 1e-5.
    x, delta, eps = jnp.asarray([Z]), jnp.asarray([DZ_PRINTED]), 1e-5
    y, vjp = jax.vjp(lambda x, s, b: layernorm(x, s, b, eps=eps), x, jnp.ones(2), jnp.zeros(2))
    dx, dscale, dbias = vjp(delta)
    mu_example = float((x ** 2).mean())
    xhat = y
    d = x.shape[-1]
    dx_example = (delta - delta.mean() - xhat * (delta * xhat).mean()) / math.sqrt(d + eps)
    add(dict(section="LayerNorm", quantity="μ = Σ x_i² / d (formula), on x = z", printed=None,
             correct=round(float(x.mean()), 5), verdict="wrong (formula)",
             note=f"the mean is Σ x_i / d; the printed formula gives {mu_example:.5f}"))
    add(dict(section="LayerNorm", quantity="dx = [δ - mean δ - x̂ mean(δ x̂)] / sqrt(d + ε) (formula)", printed=None,
             correct=_r(dx[0], 5), verdict="wrong (formula)",
             note=f"the divisor is sqrt(σ² + ε), not sqrt(d + ε) (and δ must be γ ∘ dL/dy); the printed formula "
                  f"gives {_r(dx_example[0], 5)}"))
    add(dict(section="LayerNorm", quantity="dγ = Σ δ x̂, dβ = Σ δ (formulas)", printed=None,
             correct={"dgamma": _r(dscale, 5), "dbeta": _r(dbias, 5)},
             verdict="right" if np.allclose(dscale, (delta * xhat).sum(0)) and np.allclose(dbias, delta.sum(0))
             else "wrong"))


def main(argv=None):
    args = parse_args(__doc__, argv)
    jax.config.update("jax_enable_x64", True)
    rows = []
    dz = decoder_projection(rows)
    decoder_ffn(rows, dz)
    consistent = cross_attention_step(rows, dz)
    self_attention_step(rows)
    encoder_and_layernorm(rows)
    counts = {}
    for r in rows:
        if r["verdict"] in ("wrong", LAST_DIGIT) and r["printed"] is not None and r["correct"] is not None \
                and np.shape(r["printed"]) == np.shape(r["correct"]) and np.ndim(r["printed"]) > 0:
            r["entries_differing"] = [[p, c] for p, c in zip(np.ravel(r["printed"]).tolist(),
                                                             np.ravel(r["correct"]).tolist()) if not matches(p, c)]
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    verdict = "; ".join(f"{n} {k}" for k, n in counts.items())
    path = write_result(args.out, NAME, {"rows": rows, "counts": counts,
                                         "cross_attention_layer_agrees_with_core": consistent,
                                         "verdict": verdict}, args.quick)
    for r in rows:
        print(f"[{r['section']}] {r['quantity']}: printed {r['printed']} -> {r['verdict']}; correct {r['correct']}")
    print(verdict)
    print(path)


if __name__ == "__main__":
    main()
