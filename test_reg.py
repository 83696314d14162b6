"""Tests for reg.py (the math against its sources, every optimizer's behaviour), and for
train_gpt.py and train_cifar.py (data preparation, training, resume, clear errors).

    python -m pytest -q test_reg.py

The tests follow reg.py's order (the math, routing, the optimizers), then the two training
scripts and the results tools. Each checks one property (a formula, a caveat the docs
state, the optimizer contract of torch.optim, a promise of the scripts) and fails when that
property breaks. Everything runs on the CPU with small fixtures made here; the CUDA tests
run only where a GPU is present.
"""

import argparse
import contextlib
import csv
import gzip
import hashlib
import importlib
import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tarfile
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import reg
import train_cifar
import train_gpt
from results import benchmark, long_runs, summarize
from training import runs, text_data

PLOTS = summarize.pyplot() is not None  # matplotlib is optional: without it, no figures and no error

NAMES = list(reg.OPTIMIZERS)
MATRIX_NAMES = [n for n in NAMES if n != "adamw"]


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def matrix_with_spectrum(m, n, singular_values, seed=0):
    """U diag(s) V^T with random orthonormal U, V: a matrix whose spectrum we know."""
    g = seeded(seed)
    k = len(singular_values)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.as_tensor(singular_values, dtype=torch.float64)) @ V.T, U, V


def spread(values):
    return (values.max() / values.min()).item()


# -----------------------------------------------------------------------------
# 1. The math: each function against its definition and its stated caveats
# -----------------------------------------------------------------------------

def mapped_singular_values(G, U, V):
    """NS acts on each singular value alone, keeping the singular vectors: read the
    new values off U^T NS(G) V."""
    return torch.diag(U.T @ reg.newton_schulz(G, dtype=torch.float64) @ V)


def test_newton_schulz_lands_well_conditioned_singular_values_in_range():
    for s in ([1.0] * 16, torch.linspace(1, 0.1, 16), torch.logspace(0, -2, 16)):
        G, U, V = matrix_with_spectrum(48, 24, s)
        out = mapped_singular_values(G, U, V)
        assert out.min() >= 0.6 and out.max() <= 1.25, out
        full = torch.linalg.svdvals(reg.newton_schulz(G, dtype=torch.float64))
        assert full[:16].min() >= 0.6 and full.max() <= 1.25


def test_newton_schulz_on_ill_conditioned_input_lifts_all_but_the_tiniest():
    # Condition number 1e6: every singular value above 1.5e-3 of ||G||_F lands in range;
    # those below 1e-3 are lifted (by at most a^5 ~ 490) but stay below 0.6: the caveat
    # the docstring states (the boundary sits at ~1.25e-3).
    s = torch.logspace(0, -6, 64, dtype=torch.float64)
    G, U, V = matrix_with_spectrum(128, 64, s)
    out = mapped_singular_values(G, U, V)
    x0 = s / s.norm()
    big, tiny = x0 >= 1.5e-3, x0 < 1e-3
    assert big.sum() > 20 and tiny.sum() > 20
    assert out[big].min() >= 0.6 and out.max() <= 1.25
    assert (out[tiny] < 0.6).all() and (out[tiny] > x0[tiny]).all()
    assert (out[tiny] <= 3.4445 ** 5 * x0[tiny] * 1.001).all()


def test_newton_schulz_batches_transposes_and_keeps_dtype():
    g = seeded(3)
    G = torch.randn(3, 20, 12, generator=g)
    batched = reg.newton_schulz(G)
    assert batched.shape == G.shape and batched.dtype == torch.float32
    for k in range(3):
        torch.testing.assert_close(batched[k], reg.newton_schulz(G[k]), rtol=1e-5, atol=1e-6)
    assert reg.newton_schulz(G.double()).dtype == torch.float64
    assert reg.newton_schulz(G, dtype=torch.bfloat16).dtype == torch.float32
    assert torch.equal(reg.newton_schulz(torch.zeros(5, 7)), torch.zeros(5, 7))
    with pytest.raises(ValueError, match="newton_schulz needs"):
        reg.newton_schulz(torch.ones(4))


def test_equilibrate_r_gives_unit_rows_c_unit_columns_rc_one_two_sided_step():
    g = seeded(4)
    U = torch.randn(2, 10, 7, generator=g, dtype=torch.float64) * torch.logspace(0, 3, 10, dtype=torch.float64)[:, None]
    ones_rows, ones_cols = torch.ones(2, 10, dtype=torch.float64), torch.ones(2, 7, dtype=torch.float64)
    # Unit rows / columns, up to the relative guard: a row 1000x shorter than the longest
    # has a sum of squares ~1e-6 of the mean, so the guard (1e-8 of it) moves it by ~1e-3.
    torch.testing.assert_close(reg.equilibrate(U, "R").norm(dim=-1), ones_rows, rtol=0, atol=1e-3)
    torch.testing.assert_close(reg.equilibrate(U, "C").norm(dim=-2), ones_cols, rtol=0, atol=1e-3)
    r, c = U.square().sum(-1, keepdim=True), U.square().sum(-2, keepdim=True)
    r = (r + 1e-8 * r.mean(-2, keepdim=True)).rsqrt()
    c = (c + 1e-8 * c.mean(-1, keepdim=True)).rsqrt()
    torch.testing.assert_close(reg.equilibrate(U, "RC"), r * U * c)
    # Scale-free: rows whose sums of squares are ~1e-24 (far below any absolute eps) are
    # still brought to unit norm, and bfloat16 input neither underflows nor overflows.
    for alpha in (1e-12, 1e-30, 1e25):
        for mode in ("R", "C"):
            torch.testing.assert_close(reg.equilibrate(alpha * U, mode), reg.equilibrate(U, mode))
        torch.testing.assert_close(alpha * reg.equilibrate(alpha * U, "RC"), reg.equilibrate(U, "RC"))
    small = (1e-30 * U).to(torch.bfloat16)
    torch.testing.assert_close(reg.equilibrate(small, "R").float().norm(dim=-1),
                               ones_rows.float(), atol=2e-2, rtol=0)
    assert torch.equal(reg.equilibrate(torch.zeros(3, 4), "RC"), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="mode must be"):
        reg.equilibrate(U, "X")


def test_muoneq_feeds_newton_schulz_unit_rows_or_columns(monkeypatch):
    seen = []
    monkeypatch.setattr(reg, "newton_schulz", lambda X, **kw: seen.append(X.clone()) or X)
    g = seeded(5)
    for mode, dim in (("R", -1), ("C", -2)):
        p = nn.Parameter(torch.randn(12, 9, generator=g, dtype=torch.float64))
        p.grad = torch.randn(12, 9, generator=g, dtype=torch.float64) * 100
        reg.MuonEq([dict(params=[p])], mode=mode).step()
        norms = seen[-1].norm(dim=dim)
        torch.testing.assert_close(norms, torch.ones_like(norms))


def test_normuon_rows_have_equal_norms_after_the_first_step_and_update_rms_is_0_2():
    g = seeded(6)
    W0 = torch.randn(16, 40, generator=g)
    p = nn.Parameter(W0.clone())
    p.grad = torch.randn(16, 40, generator=g) * torch.logspace(-2, 2, 16)[:, None]
    reg.NorMuon([dict(params=[p])], lr=0.1, weight_decay=0.0).step()
    step = (W0 - p.detach()) / 0.1
    row_norms = step.norm(dim=1)
    assert spread(row_norms) < 1 + 1e-5
    assert step.square().mean().sqrt().item() == pytest.approx(0.2, rel=1e-5)


def test_normuon_normalize_is_the_documented_formula():
    g = seeded(7)
    O, v = torch.randn(3, 5, 8, generator=g), torch.rand(3, 5, 1, generator=g)
    O_hat, new_v = reg.normuon_normalize(O, v, beta2=0.9)
    expected_v = 0.9 * v + 0.1 * O.square().mean(-1, keepdim=True)
    torch.testing.assert_close(new_v, expected_v)
    torch.testing.assert_close(O_hat, O / (expected_v.sqrt() + 1e-8))


def badly_scaled(seed=8):
    g = seeded(seed)
    rows = torch.logspace(0, 4, 60, dtype=torch.float64)[:, None]
    cols = torch.logspace(0, 2, 30, dtype=torch.float64)[None, :]
    return torch.randn(60, 30, generator=g, dtype=torch.float64) * rows * cols


def test_racs_is_scale_invariant():
    U = badly_scaled()
    for alpha in (1e-6, 0.3, 7.0, 1e6):
        torch.testing.assert_close(reg.racs(alpha * U), reg.racs(U))
        torch.testing.assert_close(reg.racs(alpha * U, p=1, steps=3), reg.racs(U, p=1, steps=3))


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_racs_shrinks_row_and_column_spread_each_step_until_balanced(p):
    U = badly_scaled()
    norm = lambda X, dim: torch.linalg.vector_norm(X, ord=p, dim=dim)
    rows, cols = [spread(norm(U, 1))], [spread(norm(U, 0))]
    for steps in range(1, 6):
        X = reg.racs(U, p=p, steps=steps)
        rows.append(spread(norm(X, 1)))
        cols.append(spread(norm(X, 0)))
    assert all(a > b for a, b in zip(rows, rows[1:])), rows
    assert all(a > b for a, b in zip(cols, cols[1:])), cols
    # One step takes roughly the square root of the row spread (the "gentle" step).
    assert math.sqrt(rows[0]) / 3 < rows[1] < math.sqrt(rows[0]) * 3
    X = reg.racs(U, p=p, steps=60)
    assert spread(norm(X, 1)) < 1.01 and spread(norm(X, 0)) < 1.01


def test_racs_keeps_zero_rows_and_zero_matrices_zero_and_batches():
    U = badly_scaled()
    U[3] = 0
    U[:, 5] = 0
    X = reg.racs(U, steps=4)
    assert torch.isfinite(X).all()
    assert torch.equal(X[3], torch.zeros_like(X[3])) and torch.equal(X[:, 5], torch.zeros_like(X[:, 5]))
    assert torch.equal(reg.racs(torch.zeros(4, 6)), torch.zeros(4, 6))
    batch = torch.stack([badly_scaled(1), badly_scaled(2)])
    torch.testing.assert_close(reg.racs(batch)[1], reg.racs(badly_scaled(2)))
    with pytest.raises(ValueError, match="p must be"):
        reg.racs(U, p=3)


@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (8, 3, 3, 3)])
def test_reg_update_rms_is_exactly_0_2(shape):
    g = seeded(9)
    W0 = torch.randn(*shape, generator=g)
    p = nn.Parameter(W0.clone())
    rows = torch.logspace(-3, 3, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    p.grad = torch.randn(*shape, generator=g) * rows
    reg.REG([dict(params=[p])], lr=0.1, weight_decay=0.0).step()
    rms = ((W0 - p.detach()) / 0.1).square().mean().sqrt().item()
    assert rms == pytest.approx(0.2, rel=1e-5)


def singular_value_range(coefficients, condition, dtype=torch.float64):
    s = torch.logspace(0, -math.log10(condition), 256, dtype=torch.float64)
    G, _, _ = matrix_with_spectrum(256, 512, s)
    out = torch.linalg.svdvals(reg.newton_schulz(G.to(dtype), coefficients=coefficients, dtype=dtype).double())
    return out.min().item(), out.max().item()


def test_polar_express_lands_singular_values_closer_to_one_than_keller_jordan():
    # The docstring's numbers: 256 x 512, condition 100 and 1000, 5 steps, float64.
    for condition, kj, pe in ((100, (0.68, 1.20), (0.86, 1.14)), (1000, (0.11, 1.20), (0.22, 1.14))):
        for coefficients, (low, high) in ((reg.NS_COEFFICIENTS, kj), ("polar_express", pe)):
            got = singular_value_range(coefficients, condition)
            assert got == pytest.approx((low, high), abs=0.01), (coefficients, condition, got)
    # bfloat16: much the same range, and the margin keeps the top singular value of a rank-one
    # matrix (||X||_F = its spectral norm, the edge the schedule was fit to) from exploding.
    low, high = singular_value_range(reg.POLAR_EXPRESS, 100, torch.bfloat16)
    assert 0.83 < low and high < 1.17
    g = seeded(14)
    rank_one = torch.randn(96, 1, generator=g) @ torch.randn(1, 160, generator=g)
    top = torch.linalg.svdvals(reg.newton_schulz(rank_one, coefficients="polar_express", dtype=torch.bfloat16))[0]
    assert 0.8 < top < 1.2


def test_newton_schulz_takes_one_triple_or_one_per_step_with_the_documented_margin():
    # On a diagonal matrix NS maps each singular value by the composed scalar polynomials,
    # after dividing by ||X||_F (one triple) or by SCHEDULE_MARGIN * ||X||_F (a schedule).
    s = torch.tensor([1.0, 0.5, 0.1, 0.01], dtype=torch.float64)
    G = torch.diag(s)

    def composed(x, triples):
        for a, b, c in triples:
            x = a * x + b * x ** 3 + c * x ** 5
        return x

    kj = reg.newton_schulz(G, dtype=torch.float64)
    torch.testing.assert_close(torch.diag(kj), composed(s / s.norm(), [reg.NS_COEFFICIENTS] * 5))
    assert reg.SCHEDULE_MARGIN == 1.02
    pe = reg.newton_schulz(G, dtype=torch.float64, coefficients=reg.POLAR_EXPRESS)
    torch.testing.assert_close(torch.diag(pe), composed(s / (1.02 * s.norm()), reg.POLAR_EXPRESS))
    torch.testing.assert_close(reg.newton_schulz(G, dtype=torch.float64, coefficients="polar_express"), pe)
    # A schedule shorter than `steps` repeats its last triple; a longer one is cut.
    seven = reg.newton_schulz(G, steps=7, dtype=torch.float64, coefficients=reg.POLAR_EXPRESS)
    torch.testing.assert_close(torch.diag(seven), composed(s / (1.02 * s.norm()),
                                                           list(reg.POLAR_EXPRESS) + [reg.POLAR_EXPRESS[-1]] * 2))
    three = reg.newton_schulz(G, steps=3, dtype=torch.float64, coefficients=reg.POLAR_EXPRESS)
    torch.testing.assert_close(torch.diag(three), composed(s / (1.02 * s.norm()), reg.POLAR_EXPRESS[:3]))
    assert reg.POLAR_EXPRESS[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)
    for bad in ("polar", (1.0, 2.0), [(1.0, 2.0, 3.0), (1.0, 2.0)], (1.0, float("nan"), 2.0), ()):
        with pytest.raises(ValueError, match="coefficients must be a triple"):
            reg.newton_schulz(G, coefficients=bad)


def test_row_normalize_gives_unit_rows_never_transposed_scale_free_and_zero_rows_stay_zero():
    for shape in ((6, 20), (20, 6), (2, 5, 9)):
        U = badly_scaled()[:shape[-2], :shape[-1]].expand(*shape).clone()
        X = reg.row_normalize(U)
        torch.testing.assert_close(X, U / U.norm(dim=-1, keepdim=True))  # rows, even when tall
        assert X.square().mean().sqrt().item() == pytest.approx(1 / math.sqrt(shape[-1]))
    U = badly_scaled().float()
    for alpha in (1e-30, 1e-12, 1e20):  # far outside what squares in float32 survive
        torch.testing.assert_close(reg.row_normalize(alpha * U), reg.row_normalize(U))
    U[3] = 0
    X = reg.row_normalize(U)
    assert torch.equal(X[3], torch.zeros_like(X[3])) and torch.isfinite(X).all()
    assert torch.equal(reg.row_normalize(torch.zeros(4, 6)), torch.zeros(4, 6))


def test_update_scale_formulas_and_zero_direction():
    D = torch.randn(2, 6, 24)
    assert reg.update_scale(D, "rms") == pytest.approx(0.2 * math.sqrt(24))
    assert reg.update_scale(D.mT, "spectral") == pytest.approx(math.sqrt(4))
    assert reg.update_scale(D, "spectral") == 1.0
    measured = D * reg.update_scale(D, "rms", exact_rms=True)
    torch.testing.assert_close(measured.square().mean(dim=(-2, -1)).sqrt(), torch.full((2,), 0.2))
    zero = torch.zeros(6, 24)
    assert torch.equal(zero * reg.update_scale(zero, "rms", exact_rms=True), zero)
    with pytest.raises(ValueError, match="scale must be"):
        reg.update_scale(D, "adam")


def test_matrix_stats_reads_condition_number_stable_rank_and_row_spread():
    s = [8.0, 4.0, 2.0, 2.0, 1.5, 1.0]
    M, _, _ = matrix_with_spectrum(10, 6, s)
    stats = reg.matrix_stats(M)
    assert stats["cond"] == pytest.approx(8.0)
    assert stats["stable_rank"] == pytest.approx(sum(x * x for x in s) / 64)
    rows = M.norm(dim=1)
    assert stats["row_spread"] == pytest.approx((rows.max() / rows.min()).item())
    assert reg.matrix_stats(torch.eye(5))["stable_rank"] == pytest.approx(5.0)
    rank_one = torch.ones(3, 4)
    assert reg.matrix_stats(rank_one)["cond"] is None and reg.matrix_stats(rank_one)["stable_rank"] == pytest.approx(1)
    rank_one[1] = 0
    assert reg.matrix_stats(rank_one)["row_spread"] is None
    assert reg.matrix_stats(torch.zeros(3, 4)) == dict(cond=None, stable_rank=0.0, row_spread=None)


@pytest.fixture
def compiled_math():
    """reg's math compiled for one test, then swapped back (it is global)."""
    torch._dynamo.reset()
    yield reg.use_compiled_math
    reg.use_compiled_math(False)
    torch._dynamo.reset()


def test_compiled_math_matches_eager_on_the_shapes_of_a_real_step(compiled_math):
    # Inductor on a CPU, as --compile runs it: a batch of one (square), wide, tall (the
    # transposed branch), and Newton-Schulz in bfloat16, each against the plain function.
    g = seeded(21)
    one, wide, tall = (torch.randn(*s, generator=g) for s in ((1, 24, 24), (3, 16, 40), (3, 40, 16)))
    v = torch.rand(3, 40, 1, generator=g)
    eager = {name: getattr(reg, name) for name in reg.COMPILED}
    cases = [("newton_schulz", (X,), {}) for X in (one, wide, tall)] + [
        ("newton_schulz", (wide,), {"coefficients": "polar_express"}), ("equilibrate", (tall, "RC"), {}),
        ("normuon_normalize", (tall, v), {}), ("racs", (tall,), {}), ("row_normalize", (tall,), {}),
        ("update_scale", (tall, "rms", True), {})]
    expected = [eager[name](*a, **kw) for name, a, kw in cases]
    bf16_eager = eager["newton_schulz"](wide, dtype=torch.bfloat16)
    compiled_math()
    assert all(getattr(reg, name) is not eager[name] for name in reg.COMPILED)
    for (name, a, kw), want in zip(cases, expected):
        torch.testing.assert_close(getattr(reg, name)(*a, **kw), want, rtol=1e-4, atol=1e-5, msg=name)
    # bfloat16: the compiled version rounds differently (fused), so it must be as close to
    # the float32 result as the plain bfloat16 one is, give or take.
    bf16 = reg.newton_schulz(wide, dtype=torch.bfloat16)
    exact = expected[1]
    assert (bf16 - exact).norm() < 1.5 * (bf16_eager - exact).norm() + 1e-3 * exact.norm()
    reg.use_compiled_math(False)
    assert all(getattr(reg, name) is eager[name] for name in reg.COMPILED)  # swapped back


@pytest.mark.parametrize("shaped_like", ["gpt2", "resnet18"])
def test_a_compiled_step_stays_under_the_recompile_limit(shaped_like, compiled_math):
    # Past torch's recompile limit a compiled function silently runs eager. Dynamo's guards
    # (not the backend) decide how often it compiles, so the "eager" backend shows the
    # count in seconds. The models are scaled down with every shape relation kept: GPT-2's
    # 12 blocks of tall qkv, square proj, tall fc and wide mlp_proj; ResNet-18's 11 conv
    # shapes (k, m, n), five of them a single matrix. A run uses one optimizer: each
    # configuration starts from a clean cache.
    configs = [("muon", {}), ("normuon", {"mode": "R", "ns_coefficients": "polar_express", "cautious_wd": True}),
               ("reg", {}), ("rmnp", {})]
    for name, options in configs:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = (benchmark.gpt2_small_params(blocks=12, width=32, vocab=50, context=16) if shaped_like == "gpt2"
                 else train_cifar.ResNet18(10, width=4))
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt = reg.build_optimizer(name, model, **options)
        compiled_math(backend="eager")
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for _ in range(2):
                opt.step()
        reg.use_compiled_math(False)


# -----------------------------------------------------------------------------
# 2. Routing: which parameters get the matrix rule
# -----------------------------------------------------------------------------

class TinyGPT(nn.Module):
    """Embeddings, two blocks with LayerNorm and Linear layers, a head tied to wte."""

    def __init__(self, vocab=32, width=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width),
                                                    nn.GELU(), nn.Linear(2 * width, width))
                                      for _ in range(2)])
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        return self.lm_head(self.blocks(self.wte(idx)))


class TinyCNN(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def group_ids(groups):
    return {g["name"]: {id(p) for p in g["params"]} for g in groups}


def test_param_groups_routes_hidden_matrices_to_the_matrix_rule():
    model = TinyGPT()
    ids = group_ids(reg.param_groups(model))
    hidden = {id(l.weight) for blk in model.blocks for l in blk if isinstance(l, nn.Linear)}
    assert ids["matrix"] == hidden
    assert ids["adamw"] == {id(model.wte.weight)}  # the tied head, once
    assert id(model.blocks[0][0].weight) in ids["adamw_no_decay"]
    assert id(model.blocks[0][1].bias) in ids["adamw_no_decay"]

    cnn = TinyCNN()
    ids = group_ids(reg.param_groups(cnn))
    assert ids["matrix"] == {id(cnn.conv1.weight), id(cnn.conv2.weight)}
    assert ids["adamw"] == {id(cnn.fc.weight)}
    assert id(cnn.bn1.weight) in ids["adamw_no_decay"]
    assert next(g for g in reg.param_groups(cnn) if g["name"] == "adamw_no_decay")["weight_decay"] == 0.0


def test_param_groups_overrides():
    cnn = TinyCNN()
    ids = group_ids(reg.param_groups(cnn, head=None, adamw_names=["conv1"]))
    assert ids["matrix"] == {id(cnn.conv2.weight), id(cnn.fc.weight)}
    assert ids["adamw"] == {id(cnn.conv1.weight)}
    ids = group_ids(reg.param_groups(cnn, matrix_names=["fc.weight"]))
    assert id(cnn.fc.weight) in ids["matrix"]
    with pytest.raises(TypeError, match="nn.Module"):
        reg.param_groups([nn.Parameter(torch.ones(2, 2))])


@pytest.mark.parametrize("name", NAMES)
def test_build_optimizer_takes_a_module_param_groups_or_plain_tensors(name):
    model = TinyGPT()
    by_module = reg.build_optimizer(name, model)
    assert group_ids(by_module.param_groups) == group_ids(reg.param_groups(model))
    groups = reg.param_groups(model)
    reg.build_optimizer(name, groups)
    assert "lr" not in groups[0]  # copied: torch.optim writes its defaults into the dicts it gets
    # model.parameters(), as torch users pass it: routed by shape alone, and said so (the
    # tied embedding cannot be told from a hidden matrix without the module).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = reg.build_optimizer(name, model.parameters())
    said = [str(w.message) for w in caught if "routed by shape alone" in str(w.message)]
    assert len(said) == (0 if name == "adamw" else 1), said
    ids = {g.get("name"): {id(p) for p in g["params"]} for g in opt.param_groups}
    assert ids["adamw_no_decay"] == {id(p) for p in model.parameters() if p.ndim < 2}
    assert ids["matrix"] == {id(p) for p in model.parameters() if p.ndim >= 2}
    nn.functional.cross_entropy(model(torch.tensor([[1, 2, 3]])).view(-1, 32), torch.tensor([2, 3, 4])).backward()
    opt.step()
    for junk, kind in (([1, 2], "int"), ([("a", 1)], "tuple"), ([], "nothing")):
        with pytest.raises(TypeError, match=f"got {kind}: pass the model itself"):
            reg.build_optimizer(name, junk)


def test_a_model_without_hidden_matrices_warns_and_says_where_its_weights_went():
    head_only = nn.Sequential(nn.Linear(20, 10))  # its one 2-D weight is taken as the head
    with pytest.warns(UserWarning, match=r"(?s)Muon received no hidden matrices.*0\.weight \(10, 20\).*head=None"):
        reg.build_optimizer("muon", head_only)
    opt = reg.build_optimizer("muon", reg.param_groups(head_only, head=None))  # the fix it names
    assert [g["name"] for g in opt.param_groups] == ["matrix", "adamw_no_decay"]
    text = reg.describe_groups(reg.param_groups(TinyGPT()), max_names=2)
    assert text.splitlines()[0] == ("matrix (matrix rule): 4 tensors, 2,048 numbers: "
                                    "blocks.0.1.weight (32, 16), blocks.0.3.weight (16, 32), ...")
    assert "adamw (AdamW): 1 tensors, 512 numbers: wte.weight (32, 16)" in text


# -----------------------------------------------------------------------------
# 3. The optimizers. First an independent, straight-line re-derivation of every
# update rule, written without any of reg.py's functions, one 2-D matrix at a time.
# -----------------------------------------------------------------------------

def ref_newton_schulz(G, steps=5):
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / max(torch.linalg.matrix_norm(X).item(), 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


def ref_direction(name, U, v):
    """Returns (D, new_v, rms_is_measured)."""
    if name == "muon":
        return ref_newton_schulz(U), v, False
    if name.startswith("muoneq"):
        mode = name.split("-")[1].upper()
        r, c = (U * U).sum(1), (U * U).sum(0)  # the guard is relative: 1e-8 of the mean
        row = torch.diag(1 / torch.sqrt(r + 1e-8 * r.mean()))
        col = torch.diag(1 / torch.sqrt(c + 1e-8 * c.mean()))
        E = {"R": row @ U, "C": U @ col, "RC": row @ U @ col}[mode]
        return ref_newton_schulz(E), v, False
    if name == "normuon":
        O = ref_newton_schulz(U)
        v = 0.95 * v + 0.05 * (O * O).mean(1, keepdim=True)
        return O / (torch.sqrt(v) + 1e-8), v, True
    if name == "reg":
        r = torch.sqrt((U * U).sum(1))
        c = torch.sqrt((U * U).sum(0))
        return torch.diag(r ** -0.5) @ U @ torch.diag(c ** -0.5), v, True
    if name == "rmnp":  # never transposed: rows are output units whatever the shape
        return torch.diag(1 / torch.sqrt((U * U).sum(1))) @ U, v, False
    raise AssertionError(name)


def ref_run(name, W, grads, lr, wd, scale, mu=0.95):
    m, n = W.shape
    B = torch.zeros_like(W)
    v = torch.zeros(m, 1, dtype=W.dtype)
    for G in grads:
        B = mu * B + (1 - mu) * G
        U = (1 - mu) * G + mu * B
        D, v, measured = ref_direction(name, U, v)
        if measured:  # bring D to the Frobenius norm of a semi-orthogonal m x n matrix
            D = D * math.sqrt(min(m, n)) / torch.linalg.matrix_norm(D)
        factor = 0.2 * math.sqrt(max(m, n)) if scale == "rms" else math.sqrt(max(1, m / n))
        if name == "rmnp" and scale == "rms":  # unit rows: RMS 1/sqrt(n), whatever the shape
            factor = 0.2 * math.sqrt(n)
        W = W * (1 - lr * wd) - lr * factor * D
    return W


@pytest.mark.parametrize("scale", ["rms", "spectral"])
@pytest.mark.parametrize("name", MATRIX_NAMES)
def test_update_rule_matches_straight_line_derivation_in_float64(name, scale):
    g = seeded(1)
    for shape in [(24, 40), (40, 24)]:  # wide and tall (the transposed NS path)
        W0 = torch.randn(*shape, generator=g, dtype=torch.float64)
        grads = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(6)]
        p = nn.Parameter(W0.clone())
        opt = reg.build_optimizer(name, [dict(params=[p])], lr=0.03, weight_decay=0.1,
                                  scale=scale, **({} if name in ("reg", "rmnp") else {"ns_dtype": torch.float64}))
        for G in grads:
            p.grad = G.clone()
            opt.step()
        expected = ref_run(name, W0, grads, lr=0.03, wd=0.1, scale=scale)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


def first_step(name, W0, G, lr=0.1, weight_decay=0.0, **kw):
    """The update a fresh optimizer takes on W0 with gradient G: (W0 - W1) / lr."""
    p = nn.Parameter(W0.clone())
    p.grad = G.clone()
    reg.build_optimizer(name, [dict(params=[p])], lr=lr, weight_decay=weight_decay, **kw).step()
    return (W0 - p.detach()) / lr


@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (8, 3, 3, 3)])
def test_rmnp_first_step_is_the_row_normalized_gradient_at_rms_0_2(shape):
    g = seeded(15)
    W0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    rows = torch.logspace(-3, 3, shape[0], dtype=torch.float64).reshape(-1, *[1] * (len(shape) - 1))
    G = torch.randn(*shape, generator=g, dtype=torch.float64) * rows
    step = first_step("rmnp", W0, G).reshape(shape[0], -1)  # a conv kernel as its (out, in*kh*kw) matrix
    G2 = G.reshape(shape[0], -1)
    expected = 0.2 * math.sqrt(G2.shape[1]) * G2 / G2.norm(dim=1, keepdim=True)  # rows, even when tall
    torch.testing.assert_close(step, expected)
    assert step.square().mean().sqrt().item() == pytest.approx(0.2)
    spectral = first_step("rmnp", W0, G, scale="spectral").reshape(shape[0], -1)
    m, n = G2.shape
    torch.testing.assert_close(spectral, math.sqrt(max(1, m / n)) * G2 / G2.norm(dim=1, keepdim=True))
    G2[2] = 0  # a zero row: no step there, no NaN elsewhere
    zero_row = first_step("rmnp", W0.reshape(m, n), G2)
    assert torch.equal(zero_row[2], torch.zeros(n, dtype=torch.float64)) and torch.isfinite(zero_row).all()


@pytest.mark.parametrize("name", [n for n in MATRIX_NAMES if n not in ("reg", "rmnp")])
def test_every_newton_schulz_method_takes_ns_coefficients(name, monkeypatch):
    g = seeded(16)
    W0, G = torch.randn(12, 20, generator=g), torch.randn(12, 20, generator=g)
    default = first_step(name, W0, G)
    polar = first_step(name, W0, G, ns_coefficients="polar_express")
    assert not torch.allclose(default, polar)
    torch.testing.assert_close(first_step(name, W0, G, ns_coefficients=reg.POLAR_EXPRESS), polar, rtol=0, atol=0)
    seen = []
    real = reg.newton_schulz
    monkeypatch.setattr(reg, "newton_schulz", lambda X, **kw: seen.append(kw["coefficients"]) or real(X, **kw))
    first_step(name, W0, G, ns_coefficients=[(3.0, -3.2, 1.2)] * 5)
    assert seen == [[(3.0, -3.2, 1.2)] * 5]
    with pytest.raises(ValueError, match="ns_coefficients must be a triple"):
        first_step(name, W0, G, ns_coefficients="polar")


def test_muon_with_polar_express_steps_along_polar_express_of_the_gradient():
    # From zero state the look-ahead is (1 - mu^2) G, and NS ignores the scale: the first
    # step is Polar Express of G itself, times the rms factor.
    g = seeded(17)
    W0, G = torch.randn(24, 40, generator=g, dtype=torch.float64), torch.randn(24, 40, generator=g, dtype=torch.float64)
    step = first_step("muon", W0, G, ns_coefficients="polar_express", ns_dtype=torch.float64)
    expected = 0.2 * math.sqrt(40) * reg.newton_schulz(G, coefficients=reg.POLAR_EXPRESS, dtype=torch.float64)
    torch.testing.assert_close(step, expected)


@pytest.mark.parametrize("name", MATRIX_NAMES)
def test_cautious_weight_decay_decays_exactly_where_update_and_weight_agree_in_sign(name):
    g = seeded(18)
    W0, G = torch.randn(16, 24, generator=g, dtype=torch.float64), torch.randn(16, 24, generator=g, dtype=torch.float64)
    kw = {} if name in ("reg", "rmnp") else {"ns_dtype": torch.float64}
    lr, wd = 0.1, 0.5
    D = first_step(name, W0, G, lr=lr, **kw)  # the update alone (no decay): W1 = W0 - lr*D
    agree = D * W0 >= 0
    assert 0.2 < agree.double().mean() < 0.8  # both kinds of coordinate are present
    plain = first_step(name, W0, G, lr=lr, weight_decay=wd, **kw)
    cautious = first_step(name, W0, G, lr=lr, weight_decay=wd, cautious_wd=True, **kw)
    torch.testing.assert_close(plain, D + wd * W0)  # decay everywhere
    torch.testing.assert_close(cautious, D + wd * W0 * agree)  # decay only where the signs agree
    with pytest.raises(ValueError, match="cautious_wd must be True or False"):
        first_step(name, W0, G, cautious_wd="yes", **kw)
    with pytest.raises(ValueError, match="'cautious_wd' is not an AdamW option"):
        reg.build_optimizer("adamw", mlp(), cautious_wd=True)


def test_normuon_takes_muoneq_mode_and_stacks_as_nanochat_does(monkeypatch):
    g = seeded(19)
    W0 = torch.randn(16, 40, generator=g, dtype=torch.float64)
    G = torch.randn(16, 40, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, 16, dtype=torch.float64)[:, None]
    stacked = dict(mode="R", ns_coefficients="polar_express", ns_dtype=torch.float64)
    step = first_step("normuon", W0, G, **stacked)
    # Straight-line: unit rows (relative guard), Polar Express, NorMuon's first-step row
    # normalization (v = (1-beta2) mean_j O^2), rescaled to RMS exactly 0.2.
    r = G.square().sum(1, keepdim=True)
    E = G / torch.sqrt(r + 1e-8 * r.mean())
    O = reg.newton_schulz(E, coefficients=reg.POLAR_EXPRESS, dtype=torch.float64)
    O_hat = O / (torch.sqrt(0.05 * O.square().mean(1, keepdim=True)) + 1e-8)
    torch.testing.assert_close(step, 0.2 * O_hat / O_hat.square().mean().sqrt())
    assert not torch.allclose(step, first_step("normuon", W0, G, ns_dtype=torch.float64))
    seen = []
    real = reg.newton_schulz
    monkeypatch.setattr(reg, "newton_schulz", lambda X, **kw: seen.append(X.clone()) or real(X, **kw))
    model = mlp()
    opt = reg.build_optimizer("normuon", model, lr=1e-2, mode="R", ns_coefficients="polar_express", cautious_wd=True)
    X, y = classification_problem()
    losses = train(model, opt, X, y, steps=60)
    assert losses[-1] < 0.3 * losses[0]
    torch.testing.assert_close(seen[0].norm(dim=-1), torch.ones(seen[0].shape[:-1]))  # NS got unit rows
    with pytest.raises(ValueError, match="mode must be"):
        reg.build_optimizer("normuon", model, mode="rows")


def run_matrices(name, grad_scale, steps=4):
    """Parameters after `steps` steps of a fresh optimizer on fixed gradients times grad_scale:
    a wide and a tall matrix and a conv kernel, in float32 as in training."""
    g = seeded(12)
    shapes = [(32, 48), (48, 32), (8, 3, 3, 3)]
    params = [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    grads = [[10 * torch.randn(*s, generator=g) for s in shapes] for _ in range(steps)]
    opt = reg.build_optimizer(name, [dict(params=params)], lr=0.02, weight_decay=0.1)
    for step_grads in grads:
        for p, G in zip(params, step_grads):
            p.grad = grad_scale * G
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("name", MATRIX_NAMES)
def test_every_matrix_rule_is_invariant_to_the_gradient_scale(name):
    # All gradients times c, fresh optimizer: the same steps, to float32 round-off. The
    # limit is Newton-Schulz's absolute floor (||U||_F >= 1e-7, as in torch.optim.Muon): the
    # gradients here keep ||U||_F above it even at c = 1e-8. An absolute eps anywhere else
    # (MuonEq's on the row sums, say) breaks this at c = 1e-6 already.
    reference = run_matrices(name, 1.0)
    for c in (1e-8, 1e-6, 1e-3, 1e4):
        for a, b in zip(run_matrices(name, c), reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"c={c}: {m}")


def test_adamw_part_equals_torch_adamw():
    # The embeddings, head and vectors are stepped by the AdamW inside each optimizer:
    # it must be torch.optim.AdamW (decoupled decay, bias correction), group by group.
    g = seeded(11)
    shapes = [(10, 6), (6,), (3, 2, 2)]
    W0 = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(5)]
    ours = [nn.Parameter(w.clone()) for w in W0]
    theirs = [nn.Parameter(w.clone()) for w in W0]
    with pytest.warns(UserWarning, match="no hidden matrices"):  # as intended here
        opt_ours = reg.REG([dict(params=ours[:2], use_adamw=True),
                            dict(params=ours[2:], use_adamw=True, weight_decay=0.0, lr=3e-3)],
                           lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    opt_theirs = torch.optim.AdamW([dict(params=theirs[:2]),
                                    dict(params=theirs[2:], weight_decay=0.0, lr=3e-3)],
                                   lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    for step_grads in grads:
        for a, b, G in zip(ours, theirs, step_grads):
            a.grad, b.grad = G.clone(), G.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


# -----------------------------------------------------------------------------
# Parity with torch.optim.Muon
# -----------------------------------------------------------------------------

MUON_SCALES = [("spectral", "original"), ("rms", "match_rms_adamw")]


def run_both(ours_kw, theirs_kw, steps=10, shapes=((64, 32), (32, 96), (48, 48))):
    g = seeded(2)
    W0 = [torch.randn(*s, generator=g) for s in shapes]
    grads = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(steps)]
    ours = [nn.Parameter(w.clone()) for w in W0]
    theirs = [nn.Parameter(w.clone()) for w in W0]
    opt_ours = reg.Muon([dict(params=ours)], lr=0.02, **ours_kw)
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, **theirs_kw)
    for step_grads in grads:
        for a, b, G in zip(ours, theirs, step_grads):
            a.grad, b.grad = G.clone(), G.clone()
        opt_ours.step()
        opt_theirs.step()
    return W0, ours, theirs


@pytest.mark.parametrize("scale,adjust_lr_fn", MUON_SCALES)
def test_muon_follows_torch_muon_within_bfloat16_noise(scale, adjust_lr_fn):
    # Both run Newton-Schulz in bfloat16 (8 bits of mantissa) but order their matmuls
    # differently (we: a X + (b A + c A A) X; torch: addmm chains), so each step differs by
    # bfloat16 round-off. Over 10 steps that is ~1.3% of the total displacement here; 3%
    # leaves room for other seeds while a wrong scale, sign or momentum form is >> 3%.
    W0, ours, theirs = run_both(dict(scale=scale, ns_dtype=torch.bfloat16),
                                dict(adjust_lr_fn=adjust_lr_fn))
    for w, a, b in zip(W0, ours, theirs):
        rel = ((a - b).norm() / (b - w).norm()).item()
        assert rel < 0.03, f"{tuple(w.shape)}: {rel:.4f} of the displacement"


@pytest.mark.parametrize("scale,adjust_lr_fn", MUON_SCALES)
def test_muon_equals_torch_muon_when_both_orthogonalize_in_float32(scale, adjust_lr_fn, monkeypatch):
    # torch.optim.Muon hard-codes bfloat16 in its Newton-Schulz. Re-running its optimizer
    # loop with the same iteration in float32 isolates everything else (momentum, Nesterov,
    # weight decay, lr adjustment), which must then agree to float32 round-off.
    import torch.optim._muon as torch_muon
    if not hasattr(torch_muon, "_zeropower_via_newtonschulz"):
        pytest.skip("this torch version has no torch.optim._muon._zeropower_via_newtonschulz")
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz",
                        lambda grad, coefficients, steps, eps: ref_newton_schulz(grad.float(), steps))
    W0, ours, theirs = run_both(dict(scale=scale, ns_dtype=torch.float32),
                                dict(adjust_lr_fn=adjust_lr_fn))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# Every optimizer: learns, resumes exactly, survives edge cases
# -----------------------------------------------------------------------------

def classification_problem(seed=10, n=256, dim=20, classes=5):
    """A fixed, learnable synthetic task: labels from a random 2-layer teacher."""
    g = seeded(seed)
    X = torch.randn(n, dim, generator=g)
    teacher = torch.randn(dim, 32, generator=g), torch.randn(32, classes, generator=g)
    y = (torch.tanh(X @ teacher[0]) @ teacher[1]).argmax(1)
    return X, y


def mlp(seed=0, dim=20, classes=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, classes))


def train(model, opt, X, y, steps):
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_learns_a_real_problem(name):
    X, y = classification_problem()
    model = mlp()
    losses = train(model, reg.build_optimizer(name, model, lr=1e-2), X, y, steps=60)
    assert losses[-1] < 0.3 * losses[0], f"{name}: {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_bit_identically(name):
    X, y = classification_problem()
    model = mlp()
    opt = reg.build_optimizer(name, model, lr=1e-2)
    train(model, opt, X, y, steps=3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    straight = train(model, opt, X, y, steps=4)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = mlp(seed=123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(saved["model"])
    opt2 = reg.build_optimizer(name, model2, lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    resumed = train(model2, opt2, X, y, steps=4)
    assert resumed == straight
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_give_finite_steps(name):
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = reg.build_optimizer(name, model, lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p.detach())  # no gradient, no decay: nothing may move


@pytest.mark.parametrize("name", NAMES)
def test_parameter_without_gradient_is_skipped(name):
    X, y = classification_problem()
    model = mlp()
    frozen_layer = model[2]
    before = frozen_layer.weight.detach().clone()
    opt = reg.build_optimizer(name, model, lr=1e-2)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(X), y).backward()
        frozen_layer.weight.grad = None
        opt.step()
    assert torch.equal(frozen_layer.weight.detach(), before)
    assert frozen_layer.weight not in opt.state or not opt.state[frozen_layer.weight]


@pytest.mark.parametrize("name", NAMES)
def test_conv_kernels_and_bfloat16_parameters_work(name):
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    for dtype in (torch.float32, torch.bfloat16):
        model = TinyCNN().to(dtype)
        opt = reg.build_optimizer(name, model, lr=1e-2)
        before = model.conv2.weight.detach().clone()
        losses = train(model, opt, x.to(dtype), y, steps=8)
        assert all(math.isfinite(v) for v in losses)
        assert losses[-1] < losses[0]
        assert model.conv2.weight.dtype == dtype and model.conv2.weight.shape == (8, 8, 3, 3)
        assert not torch.equal(model.conv2.weight.detach(), before)
        for p in model.parameters():
            assert torch.isfinite(p).all()


@pytest.mark.parametrize("name", MATRIX_NAMES)
def test_bfloat16_parameters_keep_float32_statistics_and_round_once(name):
    # A bfloat16 weight gets exactly the float32 step of the same (bfloat16-valued)
    # gradients, rounded once: W*(1 - lr*wd) - lr*D computed in float32. Rounding after the
    # decay and again after the step would lose the decay (W*(1 - 1e-4) == W in bfloat16).
    g = seeded(13)
    W = (0.02 * torch.randn(48, 32, generator=g)).to(torch.bfloat16)
    bias = torch.randn(32, generator=g).to(torch.bfloat16)
    grads = [(torch.randn(48, 32, generator=g), torch.randn(32, generator=g)) for _ in range(3)]
    runs = {}
    for dtype in (torch.bfloat16, torch.float32):
        w, b = nn.Parameter(W.clone().to(dtype)), nn.Parameter(bias.clone().to(dtype))
        opt = reg.build_optimizer(name, [dict(params=[w]), dict(params=[b], use_adamw=True)],
                                  lr=1e-2, weight_decay=1.0)
        w.grad, b.grad = (G.to(torch.bfloat16).to(dtype) for G in grads[0])
        opt.step()
        runs[dtype] = (w.detach().clone(), b.detach().clone(), opt)
        for G, gb in grads[1:]:  # more steps, for the running averages
            w.grad, b.grad = G.to(torch.bfloat16).to(dtype), gb.to(torch.bfloat16).to(dtype)
            opt.step()
    (w16, b16, opt16), (w32, b32, opt32) = runs[torch.bfloat16], runs[torch.float32]
    assert torch.equal(w16, w32.to(torch.bfloat16)) and torch.equal(b16, b32.to(torch.bfloat16))
    for p16, p32 in zip(opt16.state, opt32.state):
        for key, value in opt16.state[p16].items():
            if key != "step":
                assert value.dtype == torch.float32, (key, value.dtype)
        if name == "normuon" and "row_mean_square" in opt16.state[p16]:
            # The per-row second moment depends on the gradients alone: it must match the
            # float32 run exactly, not stall in bfloat16.
            assert torch.equal(opt16.state[p16]["row_mean_square"], opt32.state[p32]["row_mean_square"])


# -----------------------------------------------------------------------------
# torch.optim's conventions, as a user's own training loop relies on them
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_weights_resume_from_a_checkpoint_bit_identically(name):
    # torch's load_state_dict casts every state tensor to its parameter's dtype; ours must
    # come back float32 (and the next step run), continuing exactly as without the save.
    X, y = classification_problem()
    model = mlp().to(torch.bfloat16)
    opt = reg.build_optimizer(name, model, lr=1e-2)
    train(model, opt, X.to(torch.bfloat16), y, steps=3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    straight = train(model, opt, X.to(torch.bfloat16), y, steps=3)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = mlp(seed=5).to(torch.bfloat16)
    model2.load_state_dict(saved["model"])
    opt2 = reg.build_optimizer(name, model2, lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    if name != "adamw":  # torch's own AdamW keeps bfloat16 state for bfloat16 weights
        for state in opt2.state.values():
            assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step"), state.keys()
    assert train(model2, opt2, X.to(torch.bfloat16), y, steps=3) == straight


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR"])
def test_a_momentum_cycling_scheduler_cycles_the_matrix_rule_momentum_too(scheduler):
    X, y = classification_problem()

    def run(use_scheduler):
        model = mlp()
        opt = reg.build_optimizer("muon", model, lr=1e-2)
        if use_scheduler:
            make = getattr(torch.optim.lr_scheduler, scheduler)
            sched = (make(opt, max_lr=1e-2, total_steps=8) if scheduler == "OneCycleLR"
                     else make(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=3))
        momenta, lrs = [], []
        for step in range(8):
            if not use_scheduler:  # the same schedule, written by hand into every group
                for group in opt.param_groups:
                    group["lr"], group["momentum"] = run.lrs[step], run.momenta[step]
                    group["betas"] = (run.momenta[step], group["betas"][1])
            momenta.append(opt.param_groups[0]["betas"][0])
            lrs.append(opt.param_groups[0]["lr"])
            train(model, opt, X, y, steps=1)
            if use_scheduler:
                sched.step()
            assert opt.param_groups[0]["momentum"] == momenta[-1]  # the matrix group followed
        run.momenta, run.lrs = momenta, lrs
        return [p.detach().clone() for p in model.parameters()]

    scheduled = run(True)
    assert len(set(run.momenta)) > 3  # it really cycles
    by_hand = run(False)
    for a, b in zip(scheduled, by_hand):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_weights_frozen_when_the_optimizer_is_built_train_once_unfrozen(name):
    X, y = classification_problem()
    model = mlp()
    for p in model[2].parameters():
        p.requires_grad_(False)
    opt = reg.build_optimizer(name, model, lr=1e-2)
    before = model[2].weight.detach().clone()
    train(model, opt, X, y, steps=2)
    assert torch.equal(model[2].weight, before)  # frozen: no gradient, skipped
    for p in model[2].parameters():
        p.requires_grad_(True)
    train(model, opt, X, y, steps=2)
    assert not torch.equal(model[2].weight, before)
    if name != "adamw":
        groups = {id(p): g["name"] for g in opt.param_groups for p in g["params"]}
        assert groups[id(model[2].weight)] == "matrix" and groups[id(model[2].bias)] == "adamw_no_decay"


@pytest.mark.parametrize("name", MATRIX_NAMES)
def test_add_param_group_routes_a_new_layer_the_way_torch_users_write_it(name):
    X, y = classification_problem()
    model = mlp()
    opt = reg.build_optimizer(name, model, lr=1e-2)
    block, head = nn.Linear(5, 5), nn.Linear(5, 5)
    opt.add_param_group({"params": block.parameters()})  # a hidden layer: weight and bias split
    opt.add_param_group({"params": head.named_parameters(), "use_adamw": True, "lr": 3e-3})  # a head
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert not where[id(block.weight)]["use_adamw"] and where[id(block.weight)]["weight_decay"] == 0.1
    assert where[id(block.bias)]["use_adamw"] and where[id(block.bias)]["weight_decay"] == 0.0
    assert where[id(head.weight)]["use_adamw"] and where[id(head.weight)]["lr"] == 3e-3
    assert where[id(head.weight)]["param_names"] == ["weight", "bias"]
    assert where[id(block.bias)]["param_names"] == [f"param_groups[{len(opt.param_groups) - 2}][0]"]
    extended = nn.Sequential(*model, block, nn.GELU(), head)
    before = [p.detach().clone() for p in (block.weight, block.bias, head.weight)]
    losses = train(extended, opt, X, y, steps=5)
    assert all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(b, p) for b, p in zip(before, (block.weight, block.bias, head.weight)))
    with pytest.raises(ValueError, match="already in another param group"):
        opt.add_param_group({"params": [block.weight]})
    # An optimizer built from plain tensors (no names) takes named groups too, and the reverse.
    unnamed = reg.build_optimizer(name, [dict(params=[model[0].weight], use_adamw=False)])
    unnamed.add_param_group({"params": nn.Linear(3, 3).named_parameters()})
    assert all("param_names" in g for g in unnamed.param_groups)


@pytest.mark.parametrize("name", NAMES)
def test_named_parameters_are_taken_as_torch_takes_them(name):
    model = TinyGPT()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # routed by shape: said, and tested elsewhere
        opt = reg.build_optimizer(name, model.named_parameters())
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    nn.functional.cross_entropy(model(torch.tensor([[1, 2, 3]])).view(-1, 32), torch.tensor([2, 3, 4])).backward()
    opt.step()


@pytest.mark.filterwarnings("ignore:.*no hidden matrices")
@pytest.mark.parametrize("name", MATRIX_NAMES)
def test_a_strided_vector_gets_the_right_adamw_step_and_nothing_beside_it_moves(name):
    # torch's fused CPU AdamW kernel steps a non-contiguous tensor wrongly and writes into the
    # memory between its elements: the AdamW part must never hand it one.
    g = seeded(20)
    storage = torch.randn(12, 2, generator=g)
    strided = nn.Parameter(storage[:, 0])  # a view with stride 2: a leaf, not contiguous
    assert not strided.is_contiguous()
    reference = nn.Parameter(storage[:, 0].clone())
    beside = storage[:, 1].clone()
    ours = reg.build_optimizer(name, [dict(params=[strided], use_adamw=True)], lr=0.1)
    theirs = torch.optim.AdamW([reference], lr=0.1, weight_decay=0.1, betas=(0.9, 0.95))
    for _ in range(3):
        G = torch.randn(12, generator=g)
        strided.grad, reference.grad = G.clone(), G.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(strided.detach(), reference.detach())
    assert torch.equal(storage[:, 1], beside)


@pytest.mark.parametrize("name", MATRIX_NAMES)
def test_a_tensor_lr_is_refused_in_one_line(name):
    with pytest.raises(ValueError, match=r"lr as a Tensor is not supported: pass a number, e\.g\. lr=lr\.item\(\)"):
        reg.build_optimizer(name, mlp(), lr=torch.tensor(1e-3))


# -----------------------------------------------------------------------------
# Bad input: a clear error that names the problem
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", MATRIX_NAMES)
def test_bad_hyperparameters_are_named(name):
    model = mlp()
    cases = [(dict(lr=-1e-3), "lr must be"), (dict(lr=float("nan")), "lr must be a finite"),
             (dict(lr=float("inf")), "lr must be a finite"), (dict(momentum=1.0), "momentum"),
             (dict(momentum=-0.1), "momentum"), (dict(weight_decay=-1), "weight_decay must be"),
             (dict(scale="adam"), "scale must be"), (dict(betas=(0.9, 1.5)), r"betas\[1\]"),
             (dict(betas=0.9), r"betas must be a pair \(beta1, beta2\), got 0.9"),
             (dict(betas=(0.9,)), "betas must be a pair"), (dict(nesterove=False), "unexpected option")]
    for kw, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            reg.build_optimizer(name, model, **kw)


def test_bad_method_options_and_names():
    model = mlp()
    with pytest.raises(ValueError, match="mode must be"):
        reg.MuonEq(reg.param_groups(model), mode="rows")
    with pytest.raises(ValueError, match="p must be"):
        reg.REG(reg.param_groups(model), p=3)
    with pytest.raises(ValueError, match="racs_steps"):
        reg.REG(reg.param_groups(model), racs_steps=0)
    with pytest.raises(ValueError, match="beta2"):
        reg.NorMuon(reg.param_groups(model), beta2=1.0)
    with pytest.raises(ValueError, match="ns_steps"):
        reg.Muon(reg.param_groups(model), ns_steps=0)
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; known: adamw, muon"):
        reg.build_optimizer("lion", model)
    assert runs.optimizer_list(" adamw, reg ") == ["adamw", "reg"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown optimizer lion; known: adamw, muon"):
        runs.optimizer_list("reg,lion")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown optimizer ','"):
        runs.optimizer_list(",")
    with pytest.raises(ValueError, match="param group 1"):
        reg.Muon([dict(params=[model[0].weight]), dict(params=[model[2].weight], lr=-1)])
    with pytest.raises(ValueError, match=r"shape \(64,\) is in a matrix group.*param_groups"):
        reg.Muon([dict(params=[model[0].bias], use_adamw=False)])
    with pytest.raises(NotImplementedError):  # the skeleton alone has no direction
        bare = reg.MatrixOptimizer(reg.param_groups(model))
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        bare.step()


@pytest.mark.parametrize("name", MATRIX_NAMES)
def test_a_rejected_param_group_leaves_the_optimizer_as_it_was(name):
    model = mlp()
    opt = reg.build_optimizer(name, [dict(params=[model[0].weight])])
    bias = model[0].bias
    before = bias.detach().clone()
    with pytest.raises(ValueError, match=r"shape \(64,\) is in a matrix group"):
        opt.add_param_group(dict(params=[bias], use_adamw=False))
    for bad in (dict(lr=float("nan")), dict(lr=float("inf")), dict(weight_decay=float("nan")),
                dict(momentum=float("nan")), dict(betas=(float("nan"), 0.95))):
        with pytest.raises(ValueError, match="must be a finite number"):
            opt.add_param_group(dict(params=[model[2].weight], **bad))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [model[0].weight]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # the bias was never added: untouched, and no (64, 1) "matrix" step on it
    assert torch.equal(bias.detach(), before)
    opt.add_param_group(dict(params=[bias], use_adamw=True))  # the right way still works
    assert len(opt.param_groups) == 2


@pytest.mark.filterwarnings("ignore:.*no hidden matrices")
@pytest.mark.parametrize("name", MATRIX_NAMES)
def test_sparse_and_complex_gradients_are_refused_clearly(name):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = reg.build_optimizer(name, [dict(params=[emb.weight], use_adamw=True)])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"shape \(10, 4\) has a sparse gradient"):
        opt.step()
    w = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    w.grad = torch.ones_like(w)
    opt = reg.build_optimizer(name, [dict(params=[w])])
    with pytest.raises(RuntimeError, match="is complex"):
        opt.step()


# =============================================================================
# train_gpt.py: data preparation, training, resume, fine-tuning, bad input
# =============================================================================


DOCS = ["the cat sat on the mat. " * 6, "a dog ran in the park; the dog ran fast. " * 5,
        "then the rain came and the cat hid. " * 4, "birds sing in the morning light. " * 7,
        "the end of the story is near, the end. " * 5, "one more small document here. " * 6]


def bpe_fixture(directory, merges=(("t", "h"), ("th", "e"), ("a", "t"), ("Ġ", "th"))):
    """A tiny GPT-2-format BPE (encoder.json + vocab.bpe): the 256 byte tokens in GPT-2's
    byte-to-unicode order, a few merges and <|endoftext|>; tiktoken reads it as it reads
    the real files, so the tests need no network and no ../shared."""
    directory.mkdir(parents=True, exist_ok=True)
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    encoder = {char[b]: rank for rank, b in enumerate(printable + others)}
    for a, b in merges:
        encoder[a + b] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    (directory / "encoder.json").write_text(json.dumps(encoder))
    (directory / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return directory


@pytest.fixture
def bpe(tmp_path):
    return bpe_fixture(tmp_path / "bpe")


def write_corpus(path, docs, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": docs}), path)
    elif fmt in ("jsonl", "jsonl.gz"):
        opener = gzip.open if fmt.endswith("gz") else open
        with opener(path, "wt", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    else:
        path.write_text(docs[0] if len(docs) == 1 else "".join(docs))
    return path


def split_docs(tokens, eot):
    """Cut a token stream at EOT into documents (each must end with EOT)."""
    assert tokens[-1] == eot
    cuts = np.flatnonzero(tokens == eot)
    return [tuple(d) for d in np.split(tokens, cuts + 1)[:-1]]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "jsonl.gz"])
def test_prepare_keeps_documents_whole_with_eot_and_splits_by_document(tmp_path, bpe, fmt):
    source = write_corpus(tmp_path / f"corpus.{fmt}", DOCS, fmt)
    tok = text_data.load_tokenizer(bpe)
    meta = text_data.prepare([source], tmp_path / "cache", tok, val_fraction=0.34, seed=0)
    train = np.fromfile(tmp_path / "cache" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "cache" / "val.bin", dtype=np.uint16)
    expected = {tuple(tok.encode_ordinary(d) + [tok.eot_token]) for d in DOCS}
    got_train, got_val = split_docs(train, tok.eot_token), split_docs(val, tok.eot_token)
    assert set(got_train) | set(got_val) == expected and not set(got_train) & set(got_val)
    assert len(got_val) == meta["n_val_docs"] == 2 and len(got_train) == 4
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    # Exact duplicates are dropped (a copy in val would be a copy of train).
    dup = write_corpus(tmp_path / f"dup.{fmt}", DOCS + DOCS[:2], fmt)
    assert text_data.prepare([dup], tmp_path / "cache3", tok, val_fraction=0.34, seed=0)["n_docs"] == len(DOCS)
    # The same seed gives the same split.
    again = text_data.prepare([source], tmp_path / "cache2", tok, val_fraction=0.34, seed=0)
    assert np.array_equal(np.fromfile(tmp_path / "cache2" / "val.bin", dtype=np.uint16), val)
    assert again["val_tokens"] == meta["val_tokens"]


def test_prepare_splits_a_single_text_file_by_position(tmp_path, bpe):
    source = write_corpus(tmp_path / "one.txt", ["".join(DOCS)], "txt")
    tok = text_data.load_tokenizer(bpe)
    meta = text_data.prepare([source], tmp_path / "cache", tok, val_fraction=0.1, seed=0)
    train = np.fromfile(tmp_path / "cache" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "cache" / "val.bin", dtype=np.uint16)
    whole = tok.encode_ordinary("".join(DOCS)) + [tok.eot_token]
    assert list(np.concatenate([train, val])) == whole
    assert meta["val_tokens"] == round(0.1 * len(whole))


def test_prepare_reuses_its_cache_and_rebuilds_a_stale_or_truncated_one(tmp_path, bpe, capsys, monkeypatch):
    source = write_corpus(tmp_path / "c.jsonl", DOCS, "jsonl")
    tok = text_data.load_tokenizer(bpe)
    cache = tmp_path / "cache"
    first = text_data.prepare([source], cache, tok, 0.34, 0)
    train_bytes = (cache / "train.bin").read_bytes()

    with monkeypatch.context() as m:  # a reused cache reads no text at all
        m.setattr(text_data, "read_documents", lambda f: pytest.fail("re-read the source"))
        assert text_data.prepare([source], cache, tok, 0.34, 0) == first

    with open(cache / "train.bin", "r+b") as f:
        f.truncate(len(train_bytes) - 6)
    text_data.prepare([source], cache, tok, 0.34, 0)
    assert "truncated" in capsys.readouterr().out
    assert (cache / "train.bin").read_bytes() == train_bytes

    write_corpus(source, DOCS + ["a new document arrives. " * 5], "jsonl")
    changed = text_data.prepare([source], cache, tok, 0.34, 0)
    assert "stale" in capsys.readouterr().out
    assert changed["n_docs"] == len(DOCS) + 1


def test_local_bpe_files_give_the_gpt2_tokenizer_when_shared_data_is_there():
    shared = Path(__file__).resolve().parent.parent / "shared" / "data" / "gpt2-bpe"
    if not shared.is_dir():
        pytest.skip("../shared/data/gpt2-bpe is not beside this checkout")
    tok = text_data.load_tokenizer(shared)
    assert tok.encode_ordinary("hello world") == [31373, 995] and tok.eot_token == 50256


def gpt_args(tmp_path, data, bpe, *extra):
    return ["--data", str(data), "--bpe-dir", str(bpe), "--cache-dir", str(tmp_path / "cache"),
            "--out-dir", str(tmp_path / "out"), "--device", "cpu", "--preset", "tiny",
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
            "--batch-size", "8", "--eval-batches", "2", "--val-fraction", "0.34",
            "--warmup-steps", "3", "--quiet", *extra]


def read_run_log(tmp_path, run):
    return [json.loads(l) for l in (tmp_path / "out" / run / "log.jsonl").read_text().splitlines()]


def test_train_gpt_every_optimizer_lowers_the_loss(tmp_path, bpe):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    train_gpt.main(gpt_args(tmp_path, data, bpe, "--optimizer", ",".join(NAMES), "--lr", "1e-2",
                            "--max-steps", "30", "--eval-every", "10"))
    vocab = text_data.load_tokenizer(bpe).n_vocab
    for name in NAMES:
        log = read_run_log(tmp_path, f"{name}-lr0.01-s0")
        assert [e["step"] for e in log] == [10, 20, 30]
        assert log[-1]["val_loss"] < log[0]["val_loss"] < math.log(vocab), name
    results = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert results[0].startswith("optimizer,lr,seed") and len(results) == 1 + len(NAMES)


def test_train_gpt_resume_matches_an_uninterrupted_run(tmp_path, bpe, monkeypatch):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    common = ["--optimizer", "normuon", "--max-steps", "24", "--eval-every", "6", "--lr", "5e-3"]
    train_gpt.main(gpt_args(tmp_path, data, bpe, *common, "--out-dir", str(tmp_path / "straight")))
    straight = [json.loads(l) for l in (tmp_path / "straight" / "normuon-lr0.005-s0" / "log.jsonl").read_text().splitlines()]

    calls = {"n": 0}
    original_next = train_gpt.Batches.next

    def interrupt_at_step_15(self, load=True):
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return original_next(self, load)

    monkeypatch.setattr(train_gpt.Batches, "next", interrupt_at_step_15)
    with pytest.raises(KeyboardInterrupt):
        train_gpt.main(gpt_args(tmp_path, data, bpe, *common))
    monkeypatch.setattr(train_gpt.Batches, "next", original_next)
    run = tmp_path / "out" / "normuon-lr0.005-s0"
    assert torch.load(run / "ckpt.pt", weights_only=False)["step"] == 12  # the last checkpoint
    train_gpt.main(["--resume", str(run), "--quiet"])
    resumed = read_run_log(tmp_path, "normuon-lr0.005-s0")
    for key in ("step", "train_loss", "val_loss", "lr", "tokens"):
        assert [e[key] for e in resumed] == [e[key] for e in straight], key


def test_train_gpt_init_from_starts_from_the_checkpoint_weights(tmp_path, bpe):
    data = write_corpus(tmp_path / "c.jsonl", DOCS, "jsonl")
    other = write_corpus(tmp_path / "other.txt", ["a different text about stars and the sea. " * 30], "txt")
    train_gpt.main(gpt_args(tmp_path, data, bpe, "--optimizer", "adamw", "--max-steps", "10",
                            "--eval-every", "5"))
    pre = tmp_path / "out" / "adamw-lr0.003-s0" / "ckpt.pt"
    # lr 0: the fine-tuning run must end exactly where the checkpoint began.
    train_gpt.main(gpt_args(tmp_path, other, bpe, "--optimizer", "reg", "--max-steps", "2",
                            "--warmup-steps", "1", "--eval-every", "2", "--lr", "0", "--init-from", str(pre),
                            "--also-eval", str(data), "--out-dir", str(tmp_path / "ft")))
    before = torch.load(pre, weights_only=False)["model"]
    after = torch.load(tmp_path / "ft" / "reg-lr0-s0" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    # A step-0 eval records the starting point on the new data and on the first data; with
    # nothing learned, the first data's val loss is the pre-training run's last one.
    log = [json.loads(l) for l in (tmp_path / "ft" / "reg-lr0-s0" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0, 2]
    assert log[0]["val_loss"] == log[1]["val_loss"]
    assert log[0]["also_val_loss"] == pytest.approx(read_run_log(tmp_path, "adamw-lr0.003-s0")[-1]["val_loss"])
    # Forgetting is the rise of that loss from step 0: none at lr 0.
    header, row = (tmp_path / "ft" / "results.csv").read_text().splitlines()
    assert dict(zip(header.split(","), row.split(",")))["forgetting"] == "0.0"
    summarize.main([str(tmp_path / "ft")])
    assert (tmp_path / "ft" / "sweep.csv").exists() and (tmp_path / "ft" / "forgetting.png").exists() == PLOTS


# -----------------------------------------------------------------------------
# Checkpoints are data; one writer per run; a kill at any moment loses nothing
# -----------------------------------------------------------------------------

class RunsCode:
    """Unpickling this calls open(path, "w"): a checkpoint that runs code when loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, bpe):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    train_gpt.main(gpt_args(tmp_path, data, bpe, "--optimizer", "muon", "--max-steps", "2", "--eval-every", "2",
                            "--warmup-steps", "1"))
    run = tmp_path / "out" / "muon-lr0.003-s0"
    saved = torch.load(run / "ckpt.pt", weights_only=True)
    marker = tmp_path / "the-code-ran"
    for flag, target in (("--init-from", tmp_path / "shared.pt"), ("--resume", run / "ckpt.pt")):
        torch.save({**saved, "extra": RunsCode(marker)}, target)
        argv = (gpt_args(tmp_path, data, bpe, "--init-from", str(target), "--out-dir", str(tmp_path / "ft"))
                if flag == "--init-from" else ["--resume", str(run), "--max-steps", "4"])
        expect_error(argv, flag, "never run as code", "(it calls io.open)")
        assert not marker.exists()


def test_init_from_takes_a_plain_state_dict_and_names_what_a_foreign_file_lacks(tmp_path, bpe, capsys):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    train_gpt.main(gpt_args(tmp_path, data, bpe, "--optimizer", "adamw", "--max-steps", "2", "--eval-every", "2",
                            "--warmup-steps", "1"))
    model = torch.load(tmp_path / "out" / "adamw-lr0.003-s0" / "ckpt.pt", weights_only=True)["model"]
    torch.save(model, tmp_path / "state_dict.pt")  # model.state_dict(), as people share weights
    ft = gpt_args(tmp_path, data, bpe, "--optimizer", "reg", "--max-steps", "2", "--eval-every", "2", "--lr", "0",
                  "--warmup-steps", "1", "--out-dir", str(tmp_path / "ft"))
    capsys.readouterr()
    train_gpt.main(ft + ["--init-from", str(tmp_path / "state_dict.pt")])
    assert "a plain state_dict: 1 layers, width 32, context 16" in capsys.readouterr().out
    after = torch.load(tmp_path / "ft" / "reg-lr0-s0" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(model[k], after[k]) for k in model)  # lr 0: it started from those weights
    torch.save({"weights": model}, tmp_path / "foreign.pt")
    expect_error(ft + ["--init-from", str(tmp_path / "foreign.pt"), "--out-dir", str(tmp_path / "x")],
                 "neither a checkpoint of train_gpt.py (it has no 'model' or 'model_config')",
                 "nor a state_dict of this GPT")
    expect_error(ft + ["--init-from", str(tmp_path / "state_dict.pt"), "--n-head", "3", "--n-embd", "48", "--out-dir", str(tmp_path / "x")],
                 "width 32, which --n-head 3 does not divide")


def test_a_truncated_checkpoint_says_how_to_start_the_run_over(tmp_path, bpe):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    argv = gpt_args(tmp_path, data, bpe, "--optimizer", "muon", "--max-steps", "4", "--eval-every", "2",
                    "--warmup-steps", "1")
    train_gpt.main(argv)
    run = tmp_path / "out" / "muon-lr0.003-s0"
    (run / "ckpt.pt").write_bytes((run / "ckpt.pt").read_bytes()[:100])  # as a full disk leaves it
    json_path = run / "run.json"
    json_path.write_text(json_path.read_text().replace('"finished": true', '"finished": false'))
    for command in (["--resume", str(run), "--max-steps", "6"], argv):
        expect_error(command, "not a readable checkpoint", f"delete {run} to train that run from the start")


def test_a_run_another_process_holds_is_skipped_then_taken(tmp_path, bpe, capsys):
    import fcntl
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    argv = gpt_args(tmp_path, data, bpe, "--optimizer", "muon", "--lr", "1e-2,2e-2", "--max-steps", "2",
                    "--eval-every", "2", "--warmup-steps", "1")
    held = tmp_path / "out" / "muon-lr0.01-s0"
    held.mkdir(parents=True)
    with open(held / ".lock", "a") as lock:  # as another process training that run would hold it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        train_gpt.main(argv)
        assert "muon-lr0.01-s0: another process is training it; skipping it here" in capsys.readouterr().out
        assert not (held / "log.jsonl").exists()
        other = tmp_path / "out" / "muon-lr0.02-s0"
        assert (other / "log.jsonl").exists()
        with open(other / ".lock", "a") as second:  # --resume of a run held elsewhere: an error
            fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
            expect_error(["--resume", str(other), "--max-steps", "4"], "being trained by another process")
    train_gpt.main(argv)  # released (as by the end of that process): now this command takes it
    assert [e["step"] for e in read_run_log(tmp_path, "muon-lr0.01-s0")] == [2]


def sweep_process(tmp_path, argv):
    """train_gpt.py in a process of its own, one thread (output: .communicate())."""
    return subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py"), *argv], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def run_to_the_end(tmp_path, argv):
    process = sweep_process(tmp_path, argv)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output


def test_one_sweep_launched_twice_is_shared_out_and_each_run_trained_once(tmp_path, bpe):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    argv = gpt_args(tmp_path, data, bpe, "--optimizer", "adamw,muon", "--lr", "1e-2,2e-2", "--max-steps", "6",
                    "--eval-every", "3", "--warmup-steps", "1")
    train_gpt.main(gpt_args(tmp_path, data, bpe, "--max-steps", "2", "--eval-every", "2", "--warmup-steps", "1",
                            "--out-dir", str(tmp_path / "warm")))  # the token cache, made once
    processes = [sweep_process(tmp_path, argv) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    trained = [line.split(":")[0] for out in outputs for line in out.splitlines() if ": final val loss" in line]
    # Each run trained once, by one of the two (which one depends on timing).
    assert sorted(trained) == sorted(f"{o} lr={lr} seed=0" for o in ("adamw", "muon") for lr in ("0.01", "0.02"))
    for run in (tmp_path / "out").glob("*-s0"):
        assert [e["step"] for e in read_run_log(tmp_path, run.name)] == [3, 6]  # each line once
    assert len((tmp_path / "out" / "results.csv").read_text().splitlines()) == 5


def test_kill_9_at_any_moment_then_the_same_command_ends_as_an_uninterrupted_run(tmp_path, bpe):
    import signal
    import time
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    argv = gpt_args(tmp_path, data, bpe, "--optimizer", "muon", "--lr", "1e-2", "--max-steps", "40",
                    "--eval-every", "2", "--warmup-steps", "1")
    # Every run in a process of its own with one thread: the same kernels, the same rounding.
    run_to_the_end(tmp_path, argv + ["--out-dir", str(tmp_path / "straight")])
    straight = [json.loads(l) for l in (tmp_path / "straight" / "muon-lr0.01-s0" / "log.jsonl").read_text().splitlines()]
    log = tmp_path / "out" / "muon-lr0.01-s0" / "log.jsonl"
    for lines_before_kill in (1, 4, 9):  # killed mid-run, at whichever moment that falls on
        process = sweep_process(tmp_path, argv)
        while process.poll() is None and (not log.exists() or len(log.read_text().splitlines()) < lines_before_kill):
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
    with open(log, "a") as f:  # and a line cut short, as a kill during the append leaves it
        f.write('{"step": 99, "train_loss": 1.2')
    run_to_the_end(tmp_path, argv)
    resumed = read_run_log(tmp_path, "muon-lr0.01-s0")
    for key in ("step", "train_loss", "val_loss", "lr", "tokens"):
        assert [e[key] for e in resumed] == [e[key] for e in straight], key
    assert torch.equal(*(torch.load(d / "muon-lr0.01-s0" / "ckpt.pt", weights_only=True)["model"]["blocks.0.mlp.0.weight"]
                         for d in (tmp_path / "out", tmp_path / "straight")))


def test_summarize_drops_a_log_line_cut_short_and_names_a_bad_one_elsewhere(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "val')
    assert summarize.read_jsonl(log) == [{"step": 1}, {"step": 2}]
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(summarize.SweepError, match="line 2 is not JSON"):
        summarize.read_jsonl(log)


def test_train_gpt_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(tmp_path, bpe, monkeypatch, capsys):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 2, "jsonl")
    original_step = reg.REG.step  # patched on the class itself: torch.optim wraps each class's step
    calls = {"n": 0}

    def poison_after_7(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 7:
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.fill_(float("nan"))
        return original_step(self, closure)

    monkeypatch.setattr(reg.REG, "step", poison_after_7)
    with pytest.raises(SystemExit) as exit_info:
        train_gpt.main(gpt_args(tmp_path, data, bpe, "--optimizer", "reg", "--max-steps", "20",
                                "--eval-every", "5", "--log-every", "5"))
    message = str(exit_info.value)
    assert "the loss became nan at step 8" in message and "last good checkpoint" in message
    assert torch.load(tmp_path / "out" / "reg-lr0.003-s0" / "ckpt.pt", weights_only=False)["step"] == 5


def test_train_gpt_track_logs_inside_the_optimizers_without_changing_the_run(tmp_path, bpe):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    common = ["--optimizer", "adamw,muon,normuon,reg", "--max-steps", "12", "--eval-every", "6",
              "--lr", "1e-2"]
    weight = "blocks.0.mlp.0.weight"
    train_gpt.main(gpt_args(tmp_path, data, bpe, *common, "--out-dir", str(tmp_path / "plain")))
    train_gpt.main(gpt_args(tmp_path, data, bpe, *common, "--track", weight))
    for name in ("adamw", "muon", "normuon", "reg"):
        plain = [json.loads(l) for l in (tmp_path / "plain" / f"{name}-lr0.01-s0" / "log.jsonl").read_text().splitlines()]
        tracked = read_run_log(tmp_path, f"{name}-lr0.01-s0")
        assert [e["val_loss"] for e in tracked] == [e["val_loss"] for e in plain], name
        stats = tracked[-1]["track"][weight]
        assert set(stats) == {"momentum", "update"}
        assert set(stats["update"]) == {"cond", "stable_rank", "row_spread"}
        if name == "muon":  # orthogonalizing flattens the spectrum
            assert stats["update"]["cond"] < stats["momentum"]["cond"]
            assert stats["update"]["stable_rank"] > stats["momentum"]["stable_rank"]
        if name == "reg":   # RACS evens out the rows
            assert stats["update"]["row_spread"] < stats["momentum"]["row_spread"]
    expect_error(gpt_args(tmp_path, data, bpe, "--track", "blocks.0.nope", "--out-dir", str(tmp_path / "bad")),
                 "--track blocks.0.nope: not a weight matrix", "blocks.0.attn.qkv.weight")
    assert not (tmp_path / "bad").exists()


def test_summarize_sweep_picks_the_best_lr_on_the_sweep_seeds_and_flags_an_edge():
    runs = [dict(optimizer="adamw", lr=lr, seed=s, loss=v) for lr, s, v in [
        (1e-3, 0, 3.0), (3e-3, 0, 2.5), (3e-3, 1, 2.9), (3e-3, 2, 2.8), (1e-2, 0, 2.6), (1e-2, 1, 2.0)]]
    runs += [dict(optimizer="reg", lr=lr, seed=0, loss=v) for lr, v in [(1e-3, 3.0), (3e-3, 2.9)]]
    table = {(r["optimizer"], r["lr"]): r for r in summarize.summarize_sweep(runs, "loss")}
    # Seed 0 is the one every adamw lr ran: 3e-3 wins on it, although 1e-2 has the lower
    # mean once its extra seed is counted.
    assert [lr for (n, lr), r in table.items() if n == "adamw" and r["best"]] == [3e-3]
    best = table["adamw", 3e-3]
    assert best["n"] == 3 and best["mean"] == pytest.approx(8.2 / 3)
    assert best["std"] == pytest.approx(np.std([2.5, 2.9, 2.8], ddof=1)) and not best["edge"]
    assert table["adamw", 1e-3]["std"] == 0 and table["adamw", 1e-3]["n"] == 1
    assert table["reg", 3e-3]["best"] and table["reg", 3e-3]["edge"]  # widen the grid
    higher = {(r["optimizer"], r["lr"]): r for r in summarize.summarize_sweep(runs, "loss", lower_is_better=False)}
    assert higher["adamw", 1e-3]["best"] and higher["reg", 1e-3]["best"]


def fake_run(folder, optimizer, lr, seed, curve, script="train_gpt", metric="final_val"):
    """A finished run folder as train_gpt.py leaves it: run.json and its log (val loss per step);
    metric="test_top1" makes it a train_cifar.py run (higher is better)."""
    run = folder / f"{optimizer.replace(':', '+')}-lr{lr:g}-s{seed}"
    run.mkdir(parents=True)
    log = [dict(step=s, val_loss=v) for s, v in curve]
    (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    summary = dict(optimizer=optimizer, lr=lr, seed=seed, steps=curve[-1][0], **{metric: curve[-1][1]})
    (run / "run.json").write_text(json.dumps(dict(run=run.name, optimizer=optimizer, lr=lr, seed=seed, settings={},
                                                  script=script, finished=True, metric=metric,
                                                  lower_is_better=metric == "final_val", curve=["step", "val_loss"],
                                                  summary=summary)))


def test_long_runs_finds_the_best_lrs_and_the_steps_each_method_needs_to_reach_adamw(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, shift in ((0, 0.0), (1, 0.02)):
        fake_run(runs, "adamw", 4e-3, seed, [(100, 3.0 + shift), (200, 2.0 + shift), (300, 1.5 + shift)])
        fake_run(runs, "muon", 8e-3, seed, [(100, 2.5 + shift), (200, 1.4 + shift), (300, 1.2 + shift)])
        fake_run(runs, "reg", 1e-3, seed, [(100, 3.5), (200, 2.5), (300, 2.0)])
    fake_run(runs, "adamw", 8e-3, 0, [(100, 3.0), (200, 2.0), (300, 1.6)])  # worse: not the best lr
    fake_run(runs, "reg:p=inf:racs_steps=3", 1e-3, 0, [(100, 3.0), (200, 1.5), (300, 1.0)])  # a reading
    out = tmp_path / "results"
    long_runs.main(["text", str(runs)])  # a look: prints, writes nothing
    assert not out.exists()
    long_runs.main(["text", str(runs), "--out", str(out)])
    speedup = {r["optimizer"]: r for r in csv.DictReader((out / "long-gpt-speedup.csv").read_text().splitlines())}
    assert set(speedup) == {"adamw", "muon", "reg"}  # readings stay out of the headline files
    # AdamW's final: the mean of its seeds, 1.51. Muon's mean curve (2.51, 1.41, 1.21) reaches
    # it between steps 100 and 200: 100 + 100 * (2.51 - 1.51) / (2.51 - 1.41).
    assert float(speedup["adamw"]["adamw_final_val"]) == pytest.approx(1.51)
    assert float(speedup["muon"]["steps_to_adamw_final"]) == pytest.approx(100 + 100 * 1.0 / 1.1, abs=0.05)
    assert speedup["reg"]["steps_to_adamw_final"] == "" and speedup["adamw"]["steps_to_adamw_final"] == "300.0"
    # Each seed against the same target: AdamW's seed 0 ends at 1.50 and gets there between 200
    # and 300; its seed 1 (1.52) never does; Muon's seed 1 is its own curve, not the mean's.
    assert speedup["adamw"]["steps_per_seed"] == f"0:{200 + 100 * 0.49 / 0.5:.0f} 1:never"
    assert speedup["muon"]["steps_per_seed"] == f"0:{100 + 100 * 0.99 / 1.1:.0f} 1:{100 + 100 * 1.01 / 1.1:.0f}"
    best = list(csv.DictReader((out / "long-gpt-best.csv").read_text().splitlines()))
    assert sorted((r["optimizer"], r["lr"]) for r in best) == sorted(
        [("adamw", "0.004")] * 2 + [("muon", "0.008")] * 2 + [("reg", "0.001")] * 2)
    readings = list(csv.DictReader((out / "reg-readings.csv").read_text().splitlines()))
    assert [(r["p"], r["racs_steps"]) for r in readings] == [("2", "1"), ("2", "1"), ("inf", "3")]
    assert (out / "long-gpt-curves.png").exists() == PLOTS
    assert (out / "reg-readings.png").exists() == PLOTS
    # The readings get AdamW-equivalent steps too: (3.0, 1.5, 1.0) reaches 1.51 at 100 + 100 * 1.49 / 1.5.
    printed = capsys.readouterr().out.split("REG's readings")[-1]
    assert re.search(r"reg:p=inf:racs_steps=3 +199 \(66%\) +per seed 0:199", printed)
    assert long_runs.first_reaching([1, 2], [3.0, 2.0], 5.0) == 1.0


def test_long_runs_keeps_reg_readings_on_images_out_of_the_headline_and_writes_them_apart(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    for seed in (0, 1):
        fake_run(runs, "adamw", 3.2e-2, seed, [(1, 0.5), (8, 0.80 + seed / 100)], metric="test_top1")
        fake_run(runs, "reg", 1.6e-2, seed, [(1, 0.5), (8, 0.79)], metric="test_top1")
    fake_run(runs, "reg:racs_steps=3", 1.6e-2, 0, [(1, 0.5), (8, 0.83)], metric="test_top1")
    fake_run(runs, "reg:racs_steps=3", 3.2e-2, 0, [(1, 0.5), (8, 0.82)], metric="test_top1")
    long_runs.main(["images", str(runs), "--out", str(out)])
    best = list(csv.DictReader((out / "long-cifar10-best.csv").read_text().splitlines()))
    assert sorted({r["optimizer"] for r in best}) == ["adamw", "reg"]  # the reading beat both, and stays out
    readings = list(csv.DictReader((out / "long-cifar10-reg-readings.csv").read_text().splitlines()))
    assert [(r["p"], r["racs_steps"], float(r["lr"]), r["seed"], float(r["test_top1"])) for r in readings] == [
        ("2", "1", 1.6e-2, "0", 0.79), ("2", "1", 1.6e-2, "1", 0.79),
        ("2", "3", 1.6e-2, "0", 0.83), ("2", "3", 3.2e-2, "0", 0.82)]
    assert (out / "long-cifar10-reg-readings.png").exists() == PLOTS
    assert not (out / "reg-readings.csv").exists() and not (out / "long-gpt-speedup.csv").exists()


def test_finetune_depth_compares_at_matched_forgetting_along_the_lr_sweeps(tmp_path):
    from results import finetune_depth
    # (forgetting, new-task loss) at each lr: straight lines between neighbouring lrs
    sweep = [(0.1, 2.0), (0.3, 1.6), (0.5, 1.8)]
    assert finetune_depth.within_forgetting(sweep, 0.2) == pytest.approx(1.8)  # halfway to the 2nd lr
    assert finetune_depth.within_forgetting(sweep, 0.6) == pytest.approx(1.6)  # the best it reaches
    assert finetune_depth.within_forgetting(sweep, 0.05) is None               # forgets more at every lr
    # A method that forgets as AdamW does, 0.01 worse on the new task at every lr; its best lr
    # (lr 2) forgets more than AdamW's best (lr 1).
    adamw = {1e-3: (0.1, 2.0), 2e-3: (0.2, 1.9), 4e-3: (0.4, 1.95)}
    rows = [dict(pretrain_steps=10, optimizer=name, lr=lr * lr_scale, seed=0, new_task_loss=loss + extra,
                 forgetting=f) for name, extra, lr_scale in (("adamw", 0.0, 1), ("muon", 0.01, 2))
            for lr, (f, loss) in adamw.items()]
    out, target = finetune_depth.depth_table(rows)
    assert target == 0.2 and out["adamw"]["along"] == [0, 0, 0]
    assert out["muon"]["lr"] == 4e-3 and out["muon"]["along"] == pytest.approx([0.01, 0.01, 0.01])
    summarize.write_csv(rows, tmp_path / "depth.csv")  # the CSV comes back with its types
    assert finetune_depth.read_table(tmp_path / "depth.csv") == rows


def test_train_gpt_sweep_reuses_finished_runs_resumes_stopped_ones_and_summarizes(tmp_path, bpe, monkeypatch):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    sweep = ["--optimizer", "adamw,reg", "--lr", "1e-2", "--max-steps", "12", "--eval-every", "6"]
    train_gpt.main(gpt_args(tmp_path, data, bpe, *sweep, "--out-dir", str(tmp_path / "straight")))

    calls, original_next = {"n": 0}, train_gpt.Batches.next

    def interrupt_in_the_second_run(self, load=True):
        calls["n"] += 1
        if calls["n"] == 12 + 9:  # reg's step 9, after its checkpoint at step 6
            raise KeyboardInterrupt
        return original_next(self, load)

    monkeypatch.setattr(train_gpt.Batches, "next", interrupt_in_the_second_run)
    with pytest.raises(KeyboardInterrupt):
        train_gpt.main(gpt_args(tmp_path, data, bpe, *sweep))
    monkeypatch.setattr(train_gpt.Batches, "next", original_next)

    # The same command again (plus a second seed): adamw is reused, reg resumed from step 6.
    trained, original_train = [], train_gpt.train
    monkeypatch.setattr(train_gpt, "train", lambda args, name, lr, seed, data, run_dir, resume: trained.append(
        (name, seed, resume)) or original_train(args, name, lr, seed, data, run_dir, resume))
    train_gpt.main(gpt_args(tmp_path, data, bpe, *sweep, "--seed", "0,1"))
    assert trained == [("adamw", 1, False), ("reg", 0, True), ("reg", 1, False)]
    for run in ("adamw-lr0.01-s0", "reg-lr0.01-s0"):
        straight = [json.loads(l) for l in (tmp_path / "straight" / run / "log.jsonl").read_text().splitlines()]
        assert read_run_log(tmp_path, run) == [dict(e, time=a["time"]) for e, a in
                                               zip(straight, read_run_log(tmp_path, run))], run
    assert len((tmp_path / "out" / "results.csv").read_text().splitlines()) == 1 + 4
    rows = (tmp_path / "out" / "sweep.csv").read_text().splitlines()
    assert rows[0] == "optimizer,lr,n,mean,std,best,edge" and len(rows) == 3
    assert all(",0.01,2," in row and row.endswith(",True,False") for row in rows[1:])
    assert not list((tmp_path / "out").glob("*.tmp"))  # the CSVs were written via a temporary name
    # A run with other settings is never mixed into a sweep.
    expect_error(gpt_args(tmp_path, data, bpe, *sweep[:-4], "--max-steps", "20", "--eval-every", "6"),
                 "other settings", "max_steps: 12 vs 20", "one sweep")
    (tmp_path / "nothing").mkdir()
    expect_error([str(tmp_path / "nothing")], "no finished runs", main=summarize.main)


def test_train_gpt_byte_tokenizer_keeps_its_own_cache_and_its_checkpoints(tmp_path, bpe):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    tok = text_data.load_tokenizer(kind="bytes")
    meta = text_data.prepare([data], tmp_path / "bytes", tok, val_fraction=0.34, seed=0)
    tokens = np.concatenate([np.fromfile(tmp_path / "bytes" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert meta["n_vocab"] == 257 and tokens.max() == meta["eot"] == 256
    assert sorted(bytes(d[:-1]).decode() for d in split_docs(tokens, 256)) == sorted(set(DOCS))
    run = ["--optimizer", "adamw", "--max-steps", "4", "--eval-every", "4"]
    train_gpt.main(gpt_args(tmp_path, data, bpe, *run, "--tokenizer", "bytes"))
    train_gpt.main(gpt_args(tmp_path, data, bpe, *run, "--out-dir", str(tmp_path / "bpe")))
    caches = sorted(p.parent.name for p in (tmp_path / "cache").glob("*/*/meta.json"))
    assert caches == ["bytes", "gpt2"]  # switching back and forth re-tokenizes nothing
    assert read_run_log(tmp_path, "adamw-lr0.003-s0")[-1]["val_loss"] < math.log(257) + 0.5
    expect_error(gpt_args(tmp_path, data, bpe, "--init-from", str(tmp_path / "out" / "adamw-lr0.003-s0"),
                          "--out-dir", str(tmp_path / "ft")), "--tokenizer bytes", "pass the same")


def expect_error(argv, *fragments, main=None):
    """`main(argv)` must stop with a non-zero exit and one line that starts with "error:"
    and holds every fragment (progress bars aside), and no traceback."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        (main or train_gpt.main)(argv)
    code = exit_info.value.code
    output = (code + "\n" if isinstance(code, str) else "") + stderr.getvalue()
    assert code not in (0, None), output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in output
    return errors[0]


def test_train_gpt_bad_input_gives_clear_errors(tmp_path, bpe, monkeypatch, capsys):
    good = write_corpus(tmp_path / "c.jsonl", DOCS, "jsonl")
    expect_error(gpt_args(tmp_path, tmp_path / "missing.txt", bpe), "no such file")
    (tmp_path / "empty.txt").write_text("")
    expect_error(gpt_args(tmp_path, tmp_path / "empty.txt", bpe), "no text in")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "notext.parquet")
    expect_error(gpt_args(tmp_path, tmp_path / "notext.parquet", bpe), "no `text` column", "body")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
    expect_error(gpt_args(tmp_path, tmp_path / "bad.jsonl", bpe), "line 2", "no `text` field")
    expect_error(gpt_args(tmp_path, good, bpe, "--block-size", "100000"),
                 "too few for --block-size 100000")
    expect_error(gpt_args(tmp_path, good, bpe, "--optimizer", "adamw,lion"), "unknown optimizer lion; known: adamw")
    (tmp_path / "empty-bpe").mkdir()
    expect_error(gpt_args(tmp_path, good, tmp_path / "empty-bpe"), "encoder.json is missing")
    expect_error(["--resume", str(tmp_path / "no-run"), "--device", "cpu"], "no such file or directory")
    (tmp_path / "no-run").mkdir()
    expect_error(["--resume", str(tmp_path / "no-run"), "--device", "cpu"], "no checkpoint there")


def test_train_gpt_downloads_the_default_data_once_and_checks_its_size(tmp_path, bpe, monkeypatch):
    served = write_corpus(tmp_path / "served.parquet", DOCS * 2, "parquet")
    monkeypatch.setattr(train_gpt, "OWT_URL", served.resolve().as_uri())
    monkeypatch.setattr(train_gpt, "OWT_BYTES", served.stat().st_size + 1)
    argv = ["--cache-dir", str(tmp_path / "cache"), "--bpe-dir", str(bpe), "--device", "cpu",
            "--quiet", "--preset", "tiny", "--n-layer", "1", "--n-embd", "32", "--block-size", "16",
            "--batch-size", "4", "--max-steps", "2", "--eval-every", "2", "--eval-batches", "1",
            "--val-fraction", "0.2", "--out-dir", str(tmp_path / "out")]
    expect_error(argv, "bytes, expected")  # a short download is refused and removed
    assert not list((tmp_path / "cache").rglob("*.parquet*"))
    monkeypatch.setattr(train_gpt, "OWT_BYTES", served.stat().st_size)
    train_gpt.main(argv)
    assert len(list((tmp_path / "cache" / "openwebtext-100k").glob("*.parquet"))) == 1
    # Offline afterwards, with the download deleted: the token cache alone is enough.
    for f in (tmp_path / "cache" / "openwebtext-100k").glob("*.parquet"):
        f.unlink()
    monkeypatch.setattr(runs.urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded"))
    train_gpt.main(argv)


def test_train_gpt_offline_without_cache_names_the_url_and_the_alternative(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(runs.urllib.request, "urlopen", offline)
    expect_error(["--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--quiet"],
                 train_gpt.OWT_URL, str(tmp_path / "cache" / "openwebtext-100k"), "--data")
    assert not list((tmp_path / "cache").rglob("*.parquet*"))  # nothing that looks complete

    import tiktoken
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(train_gpt.ReportedError, match="--bpe-dir"):
        text_data.load_tokenizer(None)


# =============================================================================
# train_cifar.py: official-format data, on-device augmentation, training, resume
# =============================================================================

def write_cifar(root, dataset, n_train=200, n_test=100, seed=0):
    """An official-layout folder (Python pickles with bytes keys, as the real archives)
    whose images are easy to tell apart: each class has its own mean colour."""
    spec = train_cifar.DATASETS[dataset]
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n_classes = 10  # an easy task even in the 100-class layout
    colours = rng.uniform(40, 215, size=(n_classes, 3))

    def images_and_labels(n):
        labels = rng.integers(0, n_classes, n)
        images = colours[labels][:, :, None] + rng.normal(0, 25, (n, 3, 1024))
        return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072), labels.tolist()

    def dump(name, n):
        data, labels = images_and_labels(n)
        batch = {b"data": data, b"batch_label": name.encode()}
        if dataset == "cifar100":
            batch |= {b"fine_labels": labels, b"coarse_labels": [l // 5 for l in labels]}
        else:
            batch |= {b"labels": labels}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)

    for name in spec["train"]:
        dump(name, n_train // len(spec["train"]))
    for name in spec["test"]:
        dump(name, n_test)
    return folder


def archive_of(folder):
    path = folder.parent / "archive.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return path, hashlib.md5(path.read_bytes()).hexdigest()


def serve_locally(monkeypatch, dataset, archive, md5):
    """Point the dataset's URL at a local file: the real download code runs, offline."""
    spec = dict(train_cifar.DATASETS[dataset], url=archive.resolve().as_uri(),
                bytes=archive.stat().st_size, md5=md5)
    monkeypatch.setitem(train_cifar.DATASETS, dataset, spec)
    return spec


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_download_checks_md5_extracts_and_reads_official_pickles(tmp_path, monkeypatch, dataset):
    folder = write_cifar(tmp_path / "src", dataset)
    archive, md5 = archive_of(folder)
    serve_locally(monkeypatch, dataset, archive, md5)
    cache = tmp_path / "cache"
    extracted = train_cifar.extracted_folder(dataset, cache)
    x, y = train_cifar.read_split(extracted, dataset, "train")
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert 0 <= y.min() and y.max() < train_cifar.DATASETS[dataset]["classes"]
    xt, _ = train_cifar.read_split(extracted, dataset, "test")
    assert xt.shape == (100, 3, 32, 32)
    assert not list(cache.glob("*.part"))
    # A second call reuses the extracted copy: no download.
    monkeypatch.setattr(runs.urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded again"))
    assert train_cifar.extracted_folder(dataset, cache) == extracted


def test_cifar_bad_archives_and_folders_give_clear_errors(tmp_path, monkeypatch):
    folder = write_cifar(tmp_path / "src", "cifar100")
    archive, md5 = archive_of(folder)
    serve_locally(monkeypatch, "cifar100", archive, "0" * 32)  # the served file does not match
    with pytest.raises(train_cifar.ReportedError, match="corrupt"):
        train_cifar.extracted_folder("cifar100", tmp_path / "c1")
    assert not list((tmp_path / "c1").iterdir())  # nothing that looks complete is left

    cache = tmp_path / "c2"
    cache.mkdir()
    truncated = cache / "archive.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    serve_locally(monkeypatch, "cifar100", archive, md5)
    with pytest.raises(train_cifar.ReportedError, match="corrupt or truncated.*delete it"):
        train_cifar.extracted_folder("cifar100", cache)
    # A truncated archive whose checksum was (wrongly) accepted still fails clearly on unpacking.
    serve_locally(monkeypatch, "cifar100", archive, hashlib.md5(truncated.read_bytes()).hexdigest())
    with pytest.raises(train_cifar.ReportedError, match="cannot be unpacked"):
        train_cifar.extracted_folder("cifar100", cache)

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(runs.urllib.request, "urlopen", offline)
    with pytest.raises(train_cifar.ReportedError, match="(?s)could not download.*--data-dir"):
        train_cifar.extracted_folder("cifar100", tmp_path / "c3")

    cifar_error = dict(main=train_cifar.main)
    expect_error(["--data-dir", str(tmp_path / "nowhere"), "--device", "cpu"], "no such file or directory", **cifar_error)
    expect_error(["--data-dir", str(tmp_path), "--device", "cpu"], "train is missing", **cifar_error)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "train").write_bytes(b"not a pickle")
    (tmp_path / "junk" / "test").write_bytes(b"not a pickle")
    expect_error(["--data-dir", str(tmp_path / "junk"), "--device", "cpu"], "not an official cifar100 pickle",
                 **cifar_error)


def test_cifar_augmentation_crops_and_flips_whole_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    out = train_cifar.augment(x, g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    for k in range(64):  # every image is one of the 9x9 crops of its padded self, maybe flipped
        crops = [padded[k, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[k], c) or torch.equal(out[k], c.flip(-1)) for c in crops), k
    no_pad = train_cifar.augment(x, torch.Generator().manual_seed(1), pad=0)
    flipped = [torch.equal(no_pad[k], x[k].flip(-1)) for k in range(64)]
    assert all(flipped[k] or torch.equal(no_pad[k], x[k]) for k in range(64))
    assert 16 < sum(flipped) < 48  # about half


def cifar_args(tmp_path, folder, dataset, *extra):
    return ["--data-dir", str(folder), "--dataset", dataset, "--device", "cpu", "--net", "small",
            "--width", "8", "--batch-size", "50", "--out-dir", str(tmp_path / "out"), "--quiet", *extra]


def test_cifar_every_optimizer_beats_chance_on_an_easy_fixture(tmp_path):
    folder = write_cifar(tmp_path / "src", "cifar10", n_train=500, n_test=200)
    train_cifar.main(cifar_args(tmp_path, folder, "cifar10", "--optimizer", ",".join(NAMES),
                                "--epochs", "3", "--lr", "1e-2", "--warmup-epochs", "0.5"))
    for name in NAMES:
        log = [json.loads(l) for l in (tmp_path / "out" / f"cifar10-small-{name}-lr0.01-s0" / "log.jsonl").read_text().splitlines()]
        assert [e["epoch"] for e in log] == [1, 2, 3]
        assert log[-1]["test_top1"] > 0.4, (name, log[-1])  # chance is 0.1
        assert log[-1]["test_top5"] >= log[-1]["test_top1"]
    assert len((tmp_path / "out" / "results.csv").read_text().splitlines()) == 1 + len(NAMES)


def test_cifar_resnet18_trains_on_a_cpu_with_two_threads(tmp_path):
    # A channels_last batch through ResNet-18's strided 1x1 shortcut conv crashes oneDNN's
    # backward on a CPU with 2+ threads when the batch size is odd (a segfault or a double
    # free; torch 2.13): the last batch here has 7 images. A crash would kill pytest
    # itself, so the run goes in a child process.
    folder = write_cifar(tmp_path / "src", "cifar100", n_train=107, n_test=20)
    argv = cifar_args(tmp_path, folder, "cifar100", "--net", "resnet18", "--width", "4",
                      "--epochs", "1", "--optimizer", "muon")
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import train_cifar; train_cifar.main({argv!r})"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    log = (tmp_path / "out" / "cifar100-resnet18-muon-lr0.002-s0" / "log.jsonl").read_text()
    assert math.isfinite(json.loads(log)["train_loss"])


def test_cifar_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    folder = write_cifar(tmp_path / "src", "cifar100", n_train=300, n_test=100)
    common = ["--optimizer", "muoneq-r", "--epochs", "3", "--lr", "5e-3"]
    train_cifar.main(cifar_args(tmp_path, folder, "cifar100", *common, "--out-dir", str(tmp_path / "straight")))
    run = "cifar100-small-muoneq-r-lr0.005-s0"
    straight = [json.loads(l) for l in (tmp_path / "straight" / run / "log.jsonl").read_text().splitlines()]

    original_augment, calls = train_cifar.augment, {"n": 0}

    def interrupt_in_epoch_3(images, generator, pad=4):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original_augment(images, generator, pad)

    monkeypatch.setattr(train_cifar, "augment", interrupt_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_cifar.main(cifar_args(tmp_path, folder, "cifar100", *common))
    monkeypatch.setattr(train_cifar, "augment", original_augment)
    train_cifar.main(["--resume", str(tmp_path / "out" / run), "--quiet"])
    resumed = [json.loads(l) for l in (tmp_path / "out" / run / "log.jsonl").read_text().splitlines()]
    for key in ("epoch", "train_loss", "train_acc", "test_top1", "test_top5", "lr"):
        assert [e[key] for e in resumed] == [e[key] for e in straight], key


def test_cifar_sweep_reuses_finished_runs_and_summarizes_accuracy(tmp_path, monkeypatch):
    folder = write_cifar(tmp_path / "src", "cifar10", n_train=100, n_test=50)
    sweep = ["--optimizer", "adamw,muon", "--lr", "1e-3,1e-2", "--epochs", "1"]
    train_cifar.main(cifar_args(tmp_path, folder, "cifar10", *sweep))
    monkeypatch.setattr(train_cifar, "train", lambda *a: pytest.fail("trained a finished run again"))
    train_cifar.main(cifar_args(tmp_path, folder, "cifar10", *sweep))
    summarize.main([str(tmp_path / "out")])
    rows = [dict(zip(*[line.split(",") for line in ((tmp_path / "out" / "sweep.csv").read_text().splitlines()[0], row)]))
            for row in (tmp_path / "out" / "sweep.csv").read_text().splitlines()[1:]]
    assert len(rows) == 4 and sum(r["best"] == "True" for r in rows) == 2
    for name in ("adamw", "muon"):  # higher accuracy is better
        mine = [r for r in rows if r["optimizer"] == name]
        assert max(mine, key=lambda r: float(r["mean"]))["best"] == "True"
    expect_error(cifar_args(tmp_path, folder, "cifar10", *sweep[:-1], "3"), "other settings", "epochs: 1 vs 3",
                 main=train_cifar.main)


# -----------------------------------------------------------------------------
# Both scripts: every bad value gives one clear line and leaves nothing behind; a
# finished run changes only when it is resumed by name
# -----------------------------------------------------------------------------

def files_under(root):
    return {p: p.stat().st_size for p in Path(root).rglob("*")}


def bad_values(tmp_path, flags_with_paths):
    """(flag, bad value, fragment of the expected error line) for the shared kinds of bad input."""
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("not a folder, not a checkpoint")
    missing = str(tmp_path / "missing")
    cases = [("--lr", "-1e-3", "--lr"), ("--lr", "nan", "--lr"), ("--lr", "fast", "not a comma list"),
             ("--seed", "-1", "--seed"), ("--seed", "x", "--seed"), ("--weight-decay", "-1", "--weight-decay"),
             ("--weight-decay", "inf", "--weight-decay"), ("--optimizer", "lion", "unknown optimizer lion"),
             ("--device", "gpu", "--device gpu"), ("--out-dir", str(a_file), "not a folder"),
             ("--cache-dir", str(a_file), "not a folder"), ("--resume", missing, "no such file")]
    if not torch.cuda.is_available():
        cases.append(("--device", "cuda", "CUDA is not available"))
    return cases + [(flag, missing if value == "missing" else str(a_file), fragment)
                    for flag, value, fragment in flags_with_paths]


def test_train_gpt_every_bad_flag_value_gives_one_line_and_writes_nothing(tmp_path, bpe):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    base = gpt_args(tmp_path, data, bpe, "--out-dir", str(tmp_path / "never"))
    train_gpt.main(gpt_args(tmp_path, data, bpe, "--max-steps", "2", "--eval-every", "2", "--warmup-steps", "1",
                            "--out-dir", str(tmp_path / "first"), "--optimizer", "adamw"))  # fills the cache
    cases = bad_values(tmp_path, [("--data", "missing", "no such file"), ("--bpe-dir", "missing", "no such file"),
                                  ("--init-from", "missing", "no such file"), ("--also-eval", "missing", "no such file"),
                                  ("--init-from", "a-file", "not a readable checkpoint")])
    cases += [(f"--{flag}", "0", f"--{flag}") for flag in ("n-layer", "n-head", "n-embd", "block-size", "batch-size",
                                                           "grad-accum", "max-steps", "eval-every", "eval-batches",
                                                           "log-every")]
    cases += [("--n-embd", "31", "divisible by --n-head"), ("--warmup-steps", "-1", "--warmup-steps"),
              ("--warmup-steps", "500", "must be below --max-steps"), ("--dropout", "1.5", "--dropout"),
              ("--min-lr-ratio", "2", "--min-lr-ratio"), ("--decay-fraction", "-0.1", "--decay-fraction"),
              ("--grad-clip", "-1", "--grad-clip"), ("--val-fraction", "0", "--val-fraction"),
              ("--val-fraction", "1", "--val-fraction"), ("--data-seed", "-1", "--data-seed"),
              ("--peak-tflops", "0", "--peak-tflops"), ("--preset", "huge", "--preset"),
              ("--schedule", "linear", "--schedule"), ("--tokenizer", "chars", "--tokenizer"),
              ("--track", "blocks.0.nope", "--track blocks.0.nope: not a weight matrix")]
    before = files_under(tmp_path)
    for flag, value, fragment in cases:
        expect_error(base + [flag, value], fragment)
        assert files_under(tmp_path) == before, (flag, value)


def test_train_cifar_every_bad_flag_value_gives_one_line_and_writes_nothing(tmp_path):
    folder = write_cifar(tmp_path / "src", "cifar10", n_train=100, n_test=50)
    base = cifar_args(tmp_path, folder, "cifar10", "--out-dir", str(tmp_path / "never"))
    cases = bad_values(tmp_path, [("--data-dir", "missing", "no such file"), ("--data-dir", "a-file", "not a folder")])
    cases += [(f"--{flag}", "0", f"--{flag}") for flag in ("width", "epochs", "batch-size", "subset")]
    cases += [("--warmup-epochs", "-1", "--warmup-epochs"), ("--warmup-epochs", "50", "must be below --epochs"),
              ("--label-smoothing", "1.5", "--label-smoothing"), ("--dataset", "cifar1000", "--dataset"),
              ("--net", "vgg", "--net")]
    before = files_under(tmp_path)
    for flag, value, fragment in cases:
        expect_error(base + [flag, value], fragment, main=train_cifar.main)
        assert files_under(tmp_path) == before, (flag, value)


def file_bytes(run_dir):
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


def results_rows(folder):
    header, *rows = (folder / "results.csv").read_text().splitlines()
    return [dict(zip(header.split(","), row.split(","))) for row in rows]


def test_train_gpt_resume_continues_one_run_of_a_folder_and_keeps_every_other_run(tmp_path, bpe):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    sweep = ["--lr", "1e-2", "--max-steps", "6", "--eval-every", "3"]
    train_gpt.main(gpt_args(tmp_path, data, bpe, *sweep, "--optimizer", "adamw,reg"))
    out = tmp_path / "out"
    adamw = file_bytes(out / "adamw-lr0.01-s0")
    train_gpt.main(gpt_args(tmp_path, data, bpe, *sweep, "--optimizer", "adamw,reg"))  # reused as is
    train_gpt.main(gpt_args(tmp_path, data, bpe, *sweep, "--optimizer", "muon"))       # joins the folder
    expect_error(gpt_args(tmp_path, data, bpe, *sweep[:-4], "--max-steps", "8", "--optimizer", "muon"),
                 "other settings", "max_steps: 6 vs 8")                                 # refused
    expect_error(["--resume", str(out / "reg-lr0.01-s0"), "--lr", "0.5"], "--lr cannot change when resuming")
    expect_error(["--resume", str(out / "reg-lr0.01-s0")], "at step 6 of 6", "--max-steps above 6")
    train_gpt.main(["--resume", str(out / "reg-lr0.01-s0"), "--max-steps", "9", "--quiet"])
    assert file_bytes(out / "adamw-lr0.01-s0") == adamw
    assert [e["step"] for e in read_run_log(tmp_path, "reg-lr0.01-s0")] == [3, 6, 9]
    rows = {r["optimizer"]: r for r in results_rows(out)}
    assert set(rows) == {"adamw", "reg", "muon"} and rows["reg"]["steps"] == "9" and rows["adamw"]["steps"] == "6"


def test_train_cifar_resume_continues_one_run_of_a_folder_and_keeps_every_other_run(tmp_path):
    folder = write_cifar(tmp_path / "src", "cifar10", n_train=100, n_test=50)
    train_cifar.main(cifar_args(tmp_path, folder, "cifar10", "--optimizer", "adamw,muon", "--epochs", "2",
                                "--warmup-epochs", "0.5"))
    out = tmp_path / "out"
    adamw = file_bytes(out / "cifar10-small-adamw-lr0.003-s0")
    train_cifar.main(["--resume", str(out / "cifar10-small-muon-lr0.003-s0"), "--epochs", "3", "--quiet"])
    assert file_bytes(out / "cifar10-small-adamw-lr0.003-s0") == adamw
    rows = {r["optimizer"]: r for r in results_rows(out)}
    assert rows["adamw"]["epochs"] == "2" and rows["muon"]["epochs"] == "3"


def test_train_gpt_sizes_runs_to_their_data_and_their_warmup(tmp_path, bpe, capsys):
    gpt2 = train_gpt.PRESETS["gpt2"]
    tokens = gpt2["max_steps"] * gpt2["batch_size"] * gpt2["block_size"] * gpt2["grad_accum"]
    assert 100e6 < tokens < 114e6  # under one epoch of openwebtext-100k (~114-119M training tokens)
    args = train_gpt.parse_args(["--preset", "tiny", "--max-steps", "20", "--device", "cpu"])
    assert args.warmup_steps == 2 and "warming up for 2" in capsys.readouterr().out
    args.max_steps, args.device = 100, "cpu"
    train_gpt.describe(args, dict(train_tokens=50_000))
    out = capsys.readouterr().out
    assert "102,400 = 2.05 epochs" in out and "warning: each run sees its training data 2.0 times" in out
    args.max_steps = 10
    train_gpt.describe(args, dict(train_tokens=50_000))
    assert "warning" not in capsys.readouterr().out


def test_run_json_separates_the_startup_from_steady_throughput_and_reports_mfu(tmp_path, bpe, monkeypatch):
    # A slow first step stands for the compile (a minute or more on a GPU): it must count
    # in startup_s and stay out of the steady tokens/s that MFU is computed from.
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def first_step_slow(*args, **kwargs):  # called once per step, before the optimizer's
        calls.append(1)
        if len(calls) == 1:
            import time
            time.sleep(1.0)
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", first_step_slow)
    train_gpt.main(gpt_args(tmp_path, data, bpe, "--optimizer", "muon", "--max-steps", "8", "--eval-every", "4",
                            "--warmup-steps", "1", "--peak-tflops", "0.001"))
    summary = json.loads((tmp_path / "out" / "muon-lr0.003-s0" / "run.json").read_text())["summary"]
    assert summary["startup_s"] >= 1.0 and summary["time"] >= 1.0
    assert summary["tokens_per_s"] > 3 * summary["tokens"] / summary["time"]  # the slow step left out
    model = train_gpt.GPT(train_gpt.GPTConfig(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_embd=32))
    expected = model.flops_per_token(16) * summary["tokens_per_s"] / 1e9  # one process, peak 1 GFLOPS
    assert summary["mfu"] == pytest.approx(expected, rel=1e-2)
    header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0]
    assert header == ("optimizer,lr,seed,final_val,best_val,final_train,steps,tokens,time,startup_s,"
                      "tokens_per_s,mfu")


def test_cifar_run_json_has_startup_and_steady_images_per_s_and_its_columns(tmp_path):
    folder = write_cifar(tmp_path / "src", "cifar10", n_train=100, n_test=50)
    train_cifar.main(cifar_args(tmp_path, folder, "cifar10", "--optimizer", "muon", "--epochs", "3",
                                "--warmup-epochs", "0.5"))
    run = tmp_path / "out" / "cifar10-small-muon-lr0.003-s0"
    summary = json.loads((run / "run.json").read_text())["summary"]
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    steady = sum(e["images_per_s"] * e["epoch_time"] for e in log[1:]) / sum(e["epoch_time"] for e in log[1:])
    assert summary["images_per_s"] == round(steady)  # epochs 2 and 3: the first pays the startup
    assert 0 < summary["startup_s"] <= summary["time"] + 5
    header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0]
    assert header == "optimizer,lr,seed,epochs,test_top1,test_top5,time,startup_s,images_per_s"


def test_evaluation_leaves_the_model_training(tmp_path):
    # Left in eval mode, a fine-tuning run with --dropout would silently train without it.
    cfg = train_gpt.GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.5)
    model = train_gpt.GPT(cfg)
    batches = [(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))]
    train_gpt.evaluate(model, batches, contextlib.nullcontext())
    assert model.training and all(m.training for m in model.modules())
    net = train_cifar.SmallNet(10, width=8)
    train_cifar.evaluate(net, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), 2, contextlib.nullcontext(),
                         torch.contiguous_format)
    assert net.training and all(m.training for m in net.modules())


def test_the_last_step_is_evaluated_whatever_the_eval_interval(tmp_path, bpe):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    train_gpt.main(gpt_args(tmp_path, data, bpe, "--optimizer", "adamw", "--max-steps", "5", "--eval-every", "2",
                            "--warmup-steps", "1"))
    assert [e["step"] for e in read_run_log(tmp_path, "adamw-lr0.003-s0")] == [2, 4, 5]
    summary = json.loads((tmp_path / "out" / "adamw-lr0.003-s0" / "run.json").read_text())["summary"]
    assert summary["steps"] == 5


def test_learning_rate_schedules_step_by_step():
    # train_cifar: warmup reaches the peak at its last step, then linear decay to zero.
    assert [train_cifar.lr_factor(s, total=10, warmup=4) for s in range(10)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    # train_gpt: the same warmup, then cosine to min_lr_ratio at max_steps (or wsd: flat, then linear).
    args = argparse.Namespace(warmup_steps=2, max_steps=10, schedule="cosine", min_lr_ratio=0.1, decay_fraction=0.2)
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert [train_gpt.lr_factor(s, args) for s in range(10)] == pytest.approx([0.5, 1.0] + cosine)
    args.schedule = "wsd"
    assert [train_gpt.lr_factor(s, args) for s in range(10)] == pytest.approx([0.5, 1.0] + [1.0] * 6 + [1.0, 0.55])


def test_adamw_names_are_names_or_dotted_prefixes_never_text_prefixes():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    groups = reg.param_groups(model, head=None, adamw_names=["1"])
    adamw = [n for g in groups if g["name"] == "adamw" for n in g["param_names"]]
    assert adamw == ["1.weight"]  # not 10.weight or 11.weight
    groups = reg.param_groups(model, head=None, adamw_names=["1.weight", "10."])
    assert [n for g in groups if g["name"] == "adamw" for n in g["param_names"]] == ["1.weight", "10.weight"]


def test_mfu_uses_the_known_peak_and_the_context_actually_trained():
    assert train_gpt.known_peak_tflops("NVIDIA H100 80GB HBM3", bf16=True) == 989
    assert train_gpt.known_peak_tflops("NVIDIA H100 PCIe", bf16=True) == 756
    assert train_gpt.known_peak_tflops("NVIDIA A100-SXM4-80GB", bf16=False) == 156
    assert train_gpt.known_peak_tflops("NVIDIA GeForce RTX 4090", bf16=True) is None
    assert train_gpt.known_peak_tflops("NVIDIA H200", bf16=True) == 989  # SXM
    assert train_gpt.known_peak_tflops("NVIDIA H200 NVL", bf16=True) == 835  # not taken for an SXM
    assert train_gpt.known_peak_tflops("NVIDIA H100 NVL", bf16=True) is None
    model = train_gpt.GPT(train_gpt.GPTConfig(vocab_size=64, block_size=128, n_layer=2, n_head=2, n_embd=32))
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    assert model.flops_per_token(64) == 6 * n + 12 * 2 * 32 * 64  # the context trained, not the model's


def test_resume_trains_where_the_user_is_and_precision_follows_the_device(tmp_path, bpe, capsys, monkeypatch):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    common = ["--optimizer", "muon", "--lr", "1e-2", "--eval-every", "2", "--warmup-steps", "1"]
    train_gpt.main(gpt_args(tmp_path, data, bpe, *common, "--max-steps", "4", "--out-dir", str(tmp_path / "straight")))
    train_gpt.main(gpt_args(tmp_path, data, bpe, *common, "--max-steps", "2"))
    run = tmp_path / "out" / "muon-lr0.01-s0"
    saved = torch.load(run / "ckpt.pt", weights_only=True)  # as if saved on a GPU, compiled
    saved["args"].update(device="cuda:0", compile=True)
    saved["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(saved, run / "ckpt.pt")
    if not torch.cuda.is_available():  # no --device: it continues here, on the CPU, and says so
        capsys.readouterr()
        train_gpt.main(["--resume", str(run), "--max-steps", "4", "--no-compile", "--quiet"])
        assert "trained on cuda:0; it continues on cpu" in capsys.readouterr().out
        straight = [json.loads(l) for l in (tmp_path / "straight" / "muon-lr0.01-s0" / "log.jsonl").read_text().splitlines()]
        assert [e["val_loss"] for e in read_run_log(tmp_path, "muon-lr0.01-s0")] == [e["val_loss"] for e in straight]
    # A CPU run resumed on a machine with a GPU moves there, in bfloat16 unless it chose a precision.
    saved["args"].update(device="cpu", bf16=False, bf16_pinned=False, compile=False)
    torch.save(saved, run / "ckpt.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = runs.resumed_settings({"resume": str(run), "max_steps": 8}, train_gpt.RESUME_MAY_SET, "step", "max_steps")
    assert (args.device, args.bf16) == ("cuda", True)
    assert "continues in bfloat16 autocast" in capsys.readouterr().out
    saved["args"].update(bf16_pinned=True)
    torch.save(saved, run / "ckpt.pt")
    args = runs.resumed_settings({"resume": str(run), "max_steps": 8}, train_gpt.RESUME_MAY_SET, "step", "max_steps")
    assert (args.device, args.bf16) == ("cuda", False)
    args = runs.resumed_settings({"resume": str(run), "max_steps": 8, "device": "cpu"}, train_gpt.RESUME_MAY_SET,
                                 "step", "max_steps")
    assert args.device == "cpu"


def test_a_cuda_device_this_machine_lacks_is_named_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    runs.check_device("cuda:0")
    with pytest.raises(ValueError, match=r"--device cuda:7: this machine has 1 CUDA device \(cuda:0 to cuda:0\)"):
        runs.check_device("cuda:7")


def test_benchmark_model_routes_every_block_matrix_to_the_matrix_rule():
    model = benchmark.gpt2_small_params(blocks=2, width=16, vocab=40, context=8)
    matrix = [p for g in reg.param_groups(model) if not g["use_adamw"] for p in g["params"]]
    assert sum(p.numel() for p in matrix) == 2 * (3 + 1 + 4 + 4) * 16 * 16  # qkv, proj, fc, mlp_proj


def test_benchmark_synchronizes_the_device_it_times(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    p = nn.Parameter(torch.ones(4, 4))
    p.grad = torch.ones(4, 4)
    benchmark.time_steps(reg.build_optimizer("muon", [dict(params=[p])]), "cuda:1", steps=1, warmup=0, label="t")
    assert synced == ["cuda:1"]


def test_benchmark_shows_progress_and_prints_every_optimizer():
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "results" / "benchmark.py"), "--device", "cpu", "--blocks", "1",
                           "--width", "64", "--vocab", "100", "--steps", "1", "--warmup", "0"],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line[:22].strip() for line in done.stdout.splitlines()[2:10]]
    assert rows[1:] == ["reg", "rmnp", "muon", "muon (Polar Express)", "muoneq-r", "muoneq-rc", "normuon"], done.stdout
    assert "torch.optim.Muon" in done.stdout and "reg.Muon, NS in bfloat16" in done.stdout
    for label in ("muon", "normuon", "torch.optim.Muon"):  # a progress bar for every timing
        assert f"\n{label}: " in done.stderr or done.stderr.startswith(f"{label}: "), done.stderr


# -----------------------------------------------------------------------------
# CUDA: run only where a GPU is present (the commands of README "Checking a GPU")
# -----------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none here")


@needs_cuda
def test_cuda_newton_schulz_in_bfloat16_follows_float32():
    G, _, _ = matrix_with_spectrum(256, 128, torch.logspace(0, -2, 128), seed=14)
    G = G.float().cuda()
    X16, X32 = reg.newton_schulz(G), reg.newton_schulz(G, dtype=torch.float32)
    assert X16.dtype == torch.float32  # computed in bfloat16 (the CUDA default), returned as G's dtype
    assert ((X16 - X32).norm() / X32.norm()).item() < 0.05
    s = torch.linalg.svdvals(X16.double())
    assert s.min() > 0.5 and s.max() < 1.3


@needs_cuda
@pytest.mark.parametrize("name", NAMES)
def test_cuda_step_matches_the_cpu_step(name):
    X, y = classification_problem()
    cpu_model = mlp()
    cuda_model = mlp().cuda()
    cuda_model.load_state_dict(cpu_model.state_dict())
    for model, X_, y_ in ((cpu_model, X, y), (cuda_model, X.cuda(), y.cuda())):
        opt = reg.build_optimizer(name, model, lr=1e-2)
        nn.functional.cross_entropy(model(X_), y_).backward()
        opt.step()
    # Newton-Schulz runs in bfloat16 on CUDA and float32 on a CPU: a few percent per step.
    tolerance = 0.05 if name in ("muon", "muoneq-r", "muoneq-c", "muoneq-rc", "normuon") else 1e-4
    start = mlp().state_dict()
    for (key, a), b in zip(cpu_model.state_dict().items(), cuda_model.state_dict().values()):
        step_cpu, step_cuda = a - start[key], b.cpu() - start[key]
        assert ((step_cuda - step_cpu).norm() / step_cpu.norm()).item() < tolerance, (name, key)


@needs_cuda
def test_cuda_train_gpt_bf16_compile_and_resume(tmp_path, bpe):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    common = gpt_args(tmp_path, data, bpe, "--device", "cuda", "--compile", "--optimizer", "muon", "--lr", "1e-2",
                      "--eval-every", "2", "--warmup-steps", "1")
    train_gpt.main(common + ["--max-steps", "4", "--out-dir", str(tmp_path / "straight")])
    train_gpt.main(common + ["--max-steps", "2"])
    train_gpt.main(["--resume", str(tmp_path / "out" / "muon-lr0.01-s0"), "--max-steps", "4", "--quiet"])
    straight = [json.loads(l) for l in (tmp_path / "straight" / "muon-lr0.01-s0" / "log.jsonl").read_text().splitlines()]
    resumed = read_run_log(tmp_path, "muon-lr0.01-s0")
    assert all(math.isfinite(e["val_loss"]) for e in resumed)
    assert [e["val_loss"] for e in resumed] == pytest.approx([e["val_loss"] for e in straight], rel=1e-3)
    summary = json.loads((tmp_path / "straight" / "muon-lr0.01-s0" / "run.json").read_text())["summary"]
    assert summary["startup_s"] > 0 and summary["tokens_per_s"] > summary["tokens"] / summary["time"]
    name = torch.cuda.get_device_name()
    assert ("mfu" in summary) == (train_gpt.known_peak_tflops(name, True) is not None), (name, summary)


@needs_cuda
def test_cuda_train_cifar_resnet18_channels_last(tmp_path):
    folder = write_cifar(tmp_path / "src", "cifar100", n_train=300, n_test=100)
    train_cifar.main(cifar_args(tmp_path, folder, "cifar100", "--device", "cuda", "--net", "resnet18", "--width", "8",
                                "--epochs", "2", "--warmup-epochs", "0.5", "--optimizer", "muon", "--lr", "1e-2"))
    run = tmp_path / "out" / "cifar100-resnet18-muon-lr0.01-s0"
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["train_loss"]) for e in log) and log[-1]["images_per_s"] > 0
    weight = torch.load(run / "ckpt.pt", weights_only=False)["model"]["stem.0.weight"]
    assert weight.is_contiguous(memory_format=torch.channels_last)


# -----------------------------------------------------------------------------
# The pages: every command in README.md and results/README.md is one the scripts accept,
# the quick start and the Python snippets run as written, and every link resolves
# -----------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent
PAGES = [ROOT / "README.md", ROOT / "results" / "README.md"]


def blocks(page, language):
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)


def python_commands(page, tmp_path):
    """Every `python ...` a page's bash blocks run, as argv lists: bash itself expands the
    variables and loops, with python (and pip, git, mkdir, tar) replaced by a recorder."""
    record = tmp_path / "argv"
    record.write_text("")
    stubs = (f'python() {{ printf "%s\\0" "$@" >> {record}; printf "\\n\\0" >> {record}; }}\n'
             "pip() { :; }\ngit() { :; }\nmkdir() { :; }\ntar() { :; }\n")
    commands = []
    for block in blocks(page, "bash"):
        done = subprocess.run(["bash", "-c", stubs + block], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, (page.name, block, done.stderr)
    argv = []
    for word in record.read_text().split("\0"):
        if word == "\n":
            commands.append(argv)
            argv = []
        elif word:
            argv.append(word)
    return commands


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_command_on_the_pages_is_accepted_by_its_script(page, tmp_path, monkeypatch):
    if not page.exists():
        pytest.skip(f"{page} is not there")
    monkeypatch.setattr(train_gpt, "existing_path", str)  # paths of runs made earlier, of ../shared
    monkeypatch.setattr(train_gpt, "folder_path", str)
    monkeypatch.setattr(train_cifar, "existing_path", str)
    monkeypatch.setattr(train_cifar, "folder_path", str)
    scripts = {"train_gpt.py": train_gpt.make_parser, "train_cifar.py": train_cifar.make_parser}
    for name in ("benchmark", "directions", "finetune_depth", "long_runs", "speed", "summarize"):
        scripts[f"results/{name}.py"] = importlib.import_module(f"results.{name}").make_parser
    commands = python_commands(page, tmp_path)
    assert commands, page
    for argv in commands:
        if argv[0] == "-m":
            assert argv[1:3] == ["pytest", "-q"] and argv[3] == "test_reg.py", argv
        elif argv[0].startswith("../shared/"):  # the data's own tools
            continue
        else:  # a script of ours, and its arguments as its parser reads them
            assert argv[0] in scripts, argv
            scripts[argv[0]]().parse_args(argv[1:])


def test_the_quick_start_and_the_python_snippets_run_as_written(tmp_path, monkeypatch):
    page = ROOT / "README.md"
    quick = [argv for argv in python_commands(page, tmp_path) if "input.txt" in argv and argv[0] == "train_gpt.py"]
    text = write_corpus(tmp_path / "input.txt", ["".join(DOCS) * 4], "txt")
    tiny = ["--max-steps", "4", "--eval-every", "2", "--warmup-steps", "1", "--n-layer", "1", "--n-embd", "32",
            "--block-size", "16", "--eval-batches", "1", "--val-fraction", "0.2", "--quiet",
            "--cache-dir", str(tmp_path / "cache")]
    monkeypatch.chdir(tmp_path)
    for argv in quick:  # the last value of a flag wins: the page's commands, made tiny
        train_gpt.main([str(text) if a == "input.txt" else a for a in argv[1:]] + tiny)
    assert len(quick) == 3 and len((tmp_path / "out" / "quick" / "results.csv").read_text().splitlines()) == 1 + 3
    assert (tmp_path / "out" / "quick" / "curves.png").exists() == PLOTS
    namespace = {"__name__": "readme"}  # the snippets build on each other, as a reader's session
    for snippet in blocks(page, "python"):
        exec(snippet, namespace)


def test_every_link_on_the_pages_resolves():
    for page in PAGES:
        if not page.exists():
            continue
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), (page.name, target)


# -----------------------------------------------------------------------------
# Several processes: train_gpt.py under torchrun (DDP, gloo on a CPU)
# -----------------------------------------------------------------------------

def torchrun(tmp_path, *argv, stop_at_batch=None):
    """train_gpt.main(argv) in 2 processes; with stop_at_batch, both are interrupted when
    they draw that batch (as a Ctrl-C would stop them)."""
    wrapper = tmp_path / "launch.py"
    wrapper.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\nimport train_gpt\n"
        f"stop, calls, draw = {stop_at_batch}, [0], train_gpt.Batches.next\n"
        "def next_batch(self, load=True):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == stop:\n"
        "        raise KeyboardInterrupt\n"
        "    return draw(self, load)\n"
        "train_gpt.Batches.next = next_batch\n"
        "train_gpt.main(sys.argv[1:])\n")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(wrapper), *argv], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)


def test_train_gpt_under_torchrun_takes_the_single_process_steps_and_resumes(tmp_path, bpe):
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    argv = gpt_args(tmp_path, data, bpe, "--batch-size", "4", "--grad-accum", "2", "--max-steps", "6",
                    "--eval-every", "3", "--warmup-steps", "1", "--lr", "1e-2")
    train_gpt.main(argv + ["--optimizer", "adamw,muon", "--out-dir", str(tmp_path / "one")])
    done = torchrun(tmp_path, *argv, "--optimizer", "adamw,muon", "--out-dir", str(tmp_path / "two"),
                    "--peak-tflops", "0.001")
    assert done.returncode == 0, done.stderr[-3000:]
    # MFU per process: the global tokens/s over the two processes' peaks, not one's.
    summary = json.loads((tmp_path / "two" / "muon-lr0.01-s0" / "run.json").read_text())["summary"]
    model = train_gpt.GPT(train_gpt.GPTConfig(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_embd=32))
    assert summary["mfu"] == pytest.approx(model.flops_per_token(16) * summary["tokens_per_s"] / 2 / 1e9, rel=1e-2)
    for run in ("adamw-lr0.01-s0", "muon-lr0.01-s0"):
        one, two = ([json.loads(l) for l in (tmp_path / d / run / "log.jsonl").read_text().splitlines()]
                    for d in ("one", "two"))
        for key in ("step", "train_loss", "val_loss", "lr"):  # the same global batch, the same steps:
            assert [e[key] for e in two] == [e[key] for e in one], (run, key)  # (a+b)/2 == a/2 + b/2
    assert len((tmp_path / "two" / "results.csv").read_text().splitlines()) == 3  # rank 0 alone wrote
    # Interrupted at step 5 (after the step-3 checkpoint), then resumed: the same losses.
    stopped = torchrun(tmp_path, *argv, "--optimizer", "muon", "--out-dir", str(tmp_path / "stop"),
                       stop_at_batch=2 * 4 + 1)
    assert stopped.returncode != 0
    assert torch.load(tmp_path / "stop" / "muon-lr0.01-s0" / "ckpt.pt", weights_only=False)["step"] == 3
    resumed = torchrun(tmp_path, "--resume", str(tmp_path / "stop" / "muon-lr0.01-s0"), "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one = [json.loads(l) for l in (tmp_path / "one" / "muon-lr0.01-s0" / "log.jsonl").read_text().splitlines()]
    again = [json.loads(l) for l in (tmp_path / "stop" / "muon-lr0.01-s0" / "log.jsonl").read_text().splitlines()]
    assert [e["val_loss"] for e in again] == pytest.approx([e["val_loss"] for e in one], rel=1e-6)
    bad = torchrun(tmp_path, *gpt_args(tmp_path, data, bpe, "--grad-accum", "3", "--out-dir", str(tmp_path / "bad")))
    assert "--grad-accum 3 must be divisible by the 2 processes" in bad.stderr and not (tmp_path / "bad").exists()


def test_the_scripts_choose_bfloat16_where_the_cpu_runs_it_natively_and_keep_float32_weights(tmp_path, bpe,
                                                                                               monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(runs, "cpu_runs_bfloat16", lambda: native)
        args = train_gpt.parse_args(["--device", "cpu"])
        assert args.bf16 is native and train_cifar.parse_args(["--device", "cpu"]).bf16 is native
        note = runs.precision_note(args)
        assert ("bfloat16 autocast, float32 weights" if native else "precision: float32: this CPU has no") in note
        assert train_gpt.parse_args(["--device", "cpu", "--no-bf16"]).bf16 is False
    monkeypatch.setattr(runs, "cpu_runs_bfloat16", lambda: True)
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    train_gpt.main(gpt_args(tmp_path, data, bpe, "--optimizer", "muon", "--max-steps", "4", "--eval-every", "2"))
    saved = torch.load(tmp_path / "out" / "muon-lr0.003-s0" / "ckpt.pt", weights_only=False)
    assert saved["args"]["bf16"] is True
    assert all(t.dtype == torch.float32 for t in saved["model"].values())
    assert all(t.dtype == torch.float32 for s in saved["optimizer"]["state"].values() for t in s.values()
               if torch.is_tensor(t) and t.is_floating_point())


def test_matmul_attention_is_causal_attention():
    F = nn.functional
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 8, dtype=torch.float64) for _ in range(3))
    y = train_gpt.matmul_attention(q, k, v)
    assert torch.allclose(y, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-12)
    k2, v2 = k.clone(), v.clone()
    k2[..., 7:, :], v2[..., 7:, :] = 5.0, -5.0  # the future does not reach positions 0..6
    y2 = train_gpt.matmul_attention(q, k2, v2)
    assert torch.equal(y2[..., :7, :], y[..., :7, :]) and not torch.allclose(y2[..., 7:, :], y[..., 7:, :])


def test_attention_on_a_cpu_under_bfloat16_autocast(monkeypatch):
    # Short contexts: bfloat16 matmuls (faster there than the CPU's flash attention in either
    # precision); longer ones: flash attention, in bfloat16 as on CUDA. Either way the
    # gradient stays as close to float32's as bfloat16 matmuls allow.
    F = nn.functional
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append(q.dtype) or sdpa(q, k, v, **kw))
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx, targets = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))

    def gradient(bf16):
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            model(idx, targets).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    reference = gradient(bf16=False)
    assert seen == [torch.float32] * 2
    for max_context, attention_dtypes in ((16, []), (8, [torch.bfloat16] * 2)):
        monkeypatch.setattr(train_gpt, "CPU_MATMUL_ATTENTION_MAX_CONTEXT", max_context)
        seen.clear()
        error = (gradient(bf16=True) - reference).norm() / reference.norm()
        assert seen == attention_dtypes and 1e-4 < error < 0.03, (max_context, error)


def test_speed_gives_nanogpt_our_tokens_and_reads_its_iteration_times(tmp_path, monkeypatch, capsys):
    from results import speed
    monkeypatch.chdir(tmp_path)
    data = write_corpus(tmp_path / "c.jsonl", DOCS * 3, "jsonl")
    nanogpt = tmp_path / "nanoGPT"
    (nanogpt / "train.py").parent.mkdir()
    # A stand-in for nanoGPT's train.py: prints its per-iteration lines as the real one does.
    (nanogpt / "train.py").write_text("for i in range(301):\n    print(f'iter {i}: loss 2.5, time 100.00ms, mfu 1.00%')\n")
    speed.give_nanogpt_our_tokens(str(nanogpt), str(data))
    splits, meta = train_gpt.load_data(train_gpt.parse_args(["--tokenizer", "bytes", "--data", str(data)]), str(data))
    for split, tokens in splits.items():
        assert (nanogpt / "data" / "owtbytes" / f"{split}.bin").read_bytes() == Path(tokens.filename).read_bytes()
    vocab = pickle.loads((nanogpt / "data" / "owtbytes" / "meta.pkl").read_bytes())["vocab_size"]
    assert vocab == train_gpt.model_config(train_gpt.parse_args([]), meta, None).vocab_size == 320
    # 301 iterations of 16 x 128 tokens at 0.1 s each
    assert speed.gpt_nanogpt("4x128", str(nanogpt), tmp_path / "out") == pytest.approx(16 * 128 / 0.1)
    for bad in (["--sizes", "8x512"], ["--nanogpt", str(tmp_path)], ["--reps", "0"], ["--csv", str(tmp_path)],
                ["--csv", str(tmp_path / "no" / "x.csv")]):
        with pytest.raises(SystemExit):
            speed.main(bad)
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("speed.py: error:")


def test_speed_writes_its_measurements_only_where_told(tmp_path, monkeypatch, capsys):
    # A quick look (one size, once) must not replace the page's full table.
    from results import speed
    monkeypatch.setattr(speed, "HERE", tmp_path)
    monkeypatch.setattr(speed, "gpt_ours", lambda size, bf16, data, out: 2000.0 if bf16 else 1000.0)
    speed.main(["--sizes", "4x128", "--reps", "1"])
    assert list(tmp_path.iterdir()) == [] and "ours bf16" in capsys.readouterr().out
    speed.main(["--sizes", "4x128", "--reps", "2", "--csv", str(tmp_path / "speed.csv")])
    header, *rows = (tmp_path / "speed.csv").read_text().splitlines()
    assert header == "script,size,kind,rep,per_s,cpu" and len(rows) == 4
    assert rows[0].startswith("train_gpt.py,4x128,ours bf16,0,2000,") and "family" in rows[0]
