"""
reg.py: matrix-aware optimizers side by side, in one file that reads top to bottom.

    python reg.py                      # benchmark: step time and state bytes vs torch.optim
    python reg.py --device cuda --compile

Muon, MuonEq, NorMuon and REG all treat a weight matrix as a matrix rather than a bag of
numbers. They share one skeleton and differ in a single line, the *direction*:

    B  <- mu*B + (1-mu)*G                 momentum (EMA form), mu = 0.95
    U  =  (1-mu)*G + mu*B                 Nesterov look-ahead (U = B without it)
    D  =  direction(U)                    <- the only line that differs
    W  <- W*(1 - lr*wd) - lr*scale(D)*D   decoupled weight decay, update scaled to RMS ~0.2

    method           direction(U)                      where the balancing happens
    ---------------  --------------------------------  ------------------------------
    Muon             NS5(U)                            none: orthogonalize
    MuonEq R/C/RC    NS5(equilibrate(U))               before orthogonalization
    NorMuon          rownorm(NS5(U)), per-row 2nd mom. after orthogonalization
    REG              RACS(U)                           instead of orthogonalization
    (AdamW)          m_hat / (sqrt(v_hat) + eps)       per coordinate

Why a matrix rule at all? The momentum of a hidden layer is typically very ill-conditioned:
a few directions carry almost all of its energy, so a plain (or Adam-style) step mostly
moves the weights along those few directions. Muon replaces the momentum by its nearest
semi-orthogonal matrix (all singular values ~1), so every direction moves equally.
The other three ask how much of that balancing is needed, and where:

- Muon: Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024,
  kellerjordan.github.io/posts/muon). Orthogonalizes with a quintic Newton-Schulz iteration.
- Moonlight: Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982. Scales the
  update to the RMS of an AdamW update (0.2) so AdamW's learning rate carries over.
- MuonEq: Chang et al., "MuonEq: Balancing Before Orthogonalization with Lightweight
  Equilibration", arXiv 2603.28254. Normalizes rows (R), columns (C) or both (RC) before
  Newton-Schulz, which hands it a better-conditioned input; R is the default.
- NorMuon: Li et al., "NorMuon: Making Muon more efficient and scalable", arXiv 2510.05491.
  After orthogonalization the rows (neurons) still get very different step sizes; an
  Adam-like second moment per row evens them out.
- REG: Liu et al., "REG: A Regularization Optimizer for Robust Training Dynamics",
  arXiv 2510.03691. Replaces the matrix sign by RACS, a row-and-column scaling that
  balances the matrix gently, costs O(mn) (no matmul) and keeps only a momentum buffer.
  The paper claims this stays closer to AdamW's training dynamics, above all when
  fine-tuning an AdamW-trained model, where Muon degrades.

  A caveat about RACS: the REG paper's exact equations and code were not available to us.
  What is public says RACS is "grounded in balancing a matrix" (its Theorem 1 is the
  classical result that equalizing row norms minimizes a condition number over diagonal
  scalings), that it is gentler than the matrix sign, that it has a norm parameter p (p = 2
  best in the paper's ablation), and that REG normalizes the update's RMS. Our `racs` is OUR
  reading: one step of two-sided (Ruiz-style) balancing, X <- diag(r)^-1/2 X diag(c)^-1/2.
  Knobs to try other readings: `p` (1, 2 or inf), `racs_steps` (1 = gentle; many = a fully
  balanced matrix with equal row and column norms) and `scale`.

Parameters that are not hidden matrices (embeddings, the output head, biases, norm gains)
get AdamW inside the same optimizer object, as Keller Jordan's MuonWithAuxAdam and
Moonlight do: putting embeddings or the head under a matrix rule is the most common reason
reported for "Muon is worse than AdamW". `param_groups(model)` does that split.

The file: (1) the math as small pure functions (and `matrix_stats`, to look at what
each direction does), (2) routing parameters into groups,
(3) the optimizer skeleton and its four directions, (4) `build_optimizer` for the training
scripts, (5) a benchmark.
"""

import abc
import argparse
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.optim.adamw import adamw as adamw_update  # torch's functional AdamW

# -----------------------------------------------------------------------------
# 1. The math: small, pure functions on (..., m, n) tensors, CPU or CUDA
# -----------------------------------------------------------------------------

# Keller Jordan's quintic coefficients: chosen to make the slope at zero as steep as
# possible (small singular values grow fast) at the price of not converging exactly to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def default_ns_dtype(device):
    """bfloat16 on CUDA (as the references: fast and accurate enough for an update
    direction); float32 elsewhere, because a bfloat16 matmul on a CPU is tens of times
    slower than a float32 one."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def newton_schulz(G, steps=5, eps=1e-7, dtype=None):
    """Approximately orthogonalize G: return ~U V^T where G = U S V^T (Keller Jordan's NS5).

    X is first divided by its Frobenius norm, which bounds the spectral norm by 1; each
    step then applies the odd polynomial p(x) = a x + b x^3 + c x^5 to every singular value
    at once, via X <- a X + (b A + c A A) X with A = X X^T, pushing all of them towards 1.

    Caveats, stated honestly: these coefficients overshoot on purpose, so the output's
    singular values land roughly in [0.7, 1.2], not at exactly 1 (Muon's authors found this
    does not hurt training, and 5 steps of a steep polynomial beat many of an exact one).
    And 5 steps can lift a singular value by at most a^5 ~ 490: those below ~1/800 of
    ||G||_F come out below 0.6 (measured: every one above 1.3e-3 * ||G||_F lands in
    [0.6, 1.25]), so a very ill-conditioned G is only partly orthogonalized.

    G: (..., m, n); a leading batch dimension orthogonalizes same-shape matrices in one call.
    dtype: compute dtype; None means bfloat16 on CUDA, float32 elsewhere. Returns G's dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a (..., m, n) tensor, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype or default_ns_dtype(G.device))
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # work on the wide side: A = X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def equilibrate(U, mode="R", eps=1e-8):
    """MuonEq's pre-orthogonalization equilibration (arXiv 2603.28254).

    r_i = sum_j U_ij^2 and c_j = sum_i U_ij^2, both from the same U, then
        R:  diag(r+eps_r)^-1/2 U                       every row has unit L2 norm
        C:  U diag(c+eps_c)^-1/2                       every column has unit L2 norm
        RC: diag(r+eps_r)^-1/2 U diag(c+eps_c)^-1/2    one simultaneous two-sided step
    Removing the rows' (or columns') scale mismatch lowers the condition number that
    Newton-Schulz has to fight, so its 5 steps get closer to an orthogonal matrix. No state.

    The guard is relative: eps_r = eps * mean(r) and eps_c = eps * mean(c). The paper's
    code adds an absolute 1e-8 to a sum-form momentum (B <- mu*B + G, about 1/(1-mu) = 20x
    the gradient); our EMA momentum is 20x smaller, its sums of squares 400x, and late in a
    GPT-2-sized run many rows sum to 1e-12..1e-11: an absolute 1e-8 would swamp them and
    quietly turn MuonEq back into Muon. With a relative guard R and C do not depend on the
    scale of U at all, and RC scales as 1/scale, which Newton-Schulz's own normalization
    then removes: MuonEq's update is scale-free. U is also divided by its largest |entry| first, in float32 at
    least, so that the squares neither underflow nor overflow (bfloat16 shares float32's
    exponent range, so the same holds there). Zero rows and zero matrices stay zero.
    Returns U's dtype.
    """
    if mode not in ("R", "C", "RC"):
        raise ValueError(f"equilibrate: mode must be 'R', 'C' or 'RC', got {mode!r}")
    X = U.to(torch.promote_types(U.dtype, torch.float32))
    tiny = torch.finfo(X.dtype).tiny
    largest = X.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(tiny)
    X = X / largest                                                  # entries in [-1, 1]
    squares, Y = X.square(), X
    if "R" in mode:
        r = squares.sum(dim=-1, keepdim=True)                        # (..., m, 1)
        Y = Y * (r + eps * r.mean(dim=-2, keepdim=True)).clamp_min(tiny).rsqrt()
    if "C" in mode:
        c = squares.sum(dim=-2, keepdim=True)                        # (..., 1, n)
        Y = Y * (c + eps * c.mean(dim=-1, keepdim=True)).clamp_min(tiny).rsqrt()
    if mode == "RC":  # R and C give the same result for U and U/largest; RC scales as 1/U
        Y = Y / largest
    return Y.to(U.dtype)


def normuon_normalize(O, v, beta2=0.95, eps=1e-8):
    """NorMuon's per-neuron normalization after orthogonalization (arXiv 2510.05491).

    O: the orthogonalized momentum, (..., m, n). v: the running mean square of each row,
    (..., m, 1). Returns (O_hat, new_v) with
        new_v = beta2*v + (1-beta2)*mean_j(O_ij^2)
        O_hat = O / (sqrt(new_v) + eps)
    Even an orthogonal O gives some rows (neurons) much bigger steps than others; dividing
    each row by its running RMS evens that out, as Adam does per coordinate but with one
    number per neuron. There is no bias correction: it would multiply every row by the same
    factor, which the optimizer's RMS scaling cancels anyway.
    """
    new_v = torch.lerp(v, O.square().mean(dim=-1, keepdim=True), 1 - beta2)
    return O / (new_v.sqrt() + eps), new_v


def racs(U, p=2, steps=1):
    """RACS, row-and-column scaling: our reading of REG's operator (arXiv 2510.03691).

        repeat `steps` times:
            r_i = ||X_i,:||_p,  c_j = ||X_:,j||_p          (both from the same X)
            X  <- diag(r)^-1/2 X diag(c)^-1/2

    This is one step of Ruiz-style two-sided matrix balancing. Each step takes roughly the
    square root of the spread (max/min) of the row norms and of the column norms, so one step
    damps a dominant row or column without flattening the matrix the way the matrix sign
    does: the singular *vectors* are left largely alone. With many steps all row norms
    become equal and all column norms become equal (a balanced matrix).
    Invariant to the scale of U (a positive factor cancels); O(mn): two reductions and one
    elementwise scaling, no matmul. Zero rows and columns stay zero (no NaN, no inf).
    """
    if p not in (1, 2, math.inf):
        raise ValueError(f"racs: p must be 1, 2 or math.inf, got {p!r}")
    X = U
    tiny = torch.finfo(U.dtype).tiny  # only keeps 0 * inf from happening on a zero row
    for _ in range(steps):
        # |X|^p once, summed along each axis, gives both ||row||_p^p and ||col||_p^p (one
        # elementwise pass instead of two norms; a strided column norm is slow on CPUs).
        A = X.square() if p == 2 else X.abs()
        if p == math.inf:
            r, c = A.amax(dim=-1, keepdim=True), A.amax(dim=-2, keepdim=True)
            power = -0.5                 # diag(r)^-1/2 with r the max-norm itself
        else:
            r, c = A.sum(dim=-1, keepdim=True), A.sum(dim=-2, keepdim=True)
            power = -0.5 / p             # (||.||_p^p)^(-1/(2p)) = ||.||_p^(-1/2)
        X = (X * r.clamp_min(tiny).pow(power)).mul_(c.clamp_min(tiny).pow(power))
    return X


def update_scale(D, scale="rms", measure_rms=False):
    """The factor the direction D (..., m, n) is multiplied by before lr.

    scale="rms" (default, Moonlight): make the update's RMS ~0.2, the typical RMS of an
    AdamW update, so AdamW's learning rate and weight decay carry over.
    scale="spectral" (Keller Jordan): sqrt(max(1, m/n)) on an orthogonal direction; Muon's
    usual lr is then ~0.02.

    Muon's direction is (nearly) semi-orthogonal, so its RMS is known from the shape alone:
    1/sqrt(max(m, n)); the factor is then 0.2*sqrt(max(m, n)) or sqrt(max(1, m/n)), exactly
    torch.optim.Muon's "match_rms_adamw" and "original". NorMuon's and REG's directions have
    no such fixed RMS, so `measure_rms=True` first rescales D to the RMS a semi-orthogonal
    matrix of its shape would have, which makes the "rms" update's RMS exactly 0.2.
    A zero direction gives a zero step, never NaN.
    """
    m, n = D.shape[-2:]
    if scale == "rms":
        factor = 0.2 * math.sqrt(max(m, n))
    elif scale == "spectral":
        factor = math.sqrt(max(1.0, m / n))
    else:
        raise ValueError(f"scale must be 'rms' or 'spectral', got {scale!r}")
    if not measure_rms:
        return factor
    rms = torch.linalg.vector_norm(D, dim=(-2, -1), keepdim=True) / math.sqrt(m * n)
    return factor / (math.sqrt(max(m, n)) * rms).clamp_min(1e-30)


def matrix_stats(M):
    """How balanced a matrix is, in three numbers; for looking inside the optimizers.

    cond:        largest / smallest of its min(m, n) singular values (None when numerically
                 singular: the smallest is below matrix_rank's tolerance)
    stable_rank: ||M||_F^2 / ||M||_2^2, from 1 (one direction carries all the energy)
                 up to min(m, n) (all directions equal: an orthogonal matrix)
    row_spread:  largest / smallest row norm (None with a zero row)
    A momentum matrix typically has a huge cond and a stable rank near 1; NS5 drives cond
    towards 1, NorMuon drives row_spread to 1, RACS shrinks both gently."""
    M = M.detach().double().reshape(M.shape[0], -1)
    s = torch.linalg.svdvals(M)
    rows = M.norm(dim=1)
    singular = s[-1] <= s[0] * max(M.shape) * torch.finfo(M.dtype).eps
    return dict(cond=None if singular else (s[0] / s[-1]).item(),
                stable_rank=(s.square().sum() / s[0] ** 2).item() if s[0] > 0 else 0.0,
                row_spread=(rows.max() / rows.min()).item() if rows.min() > 0 else None)


def use_compiled_math():
    """Swap the functions above for torch.compile'd versions. The optimizers look them up
    by name at each step, so this speeds up every method at once. Mostly a CUDA win: it
    fuses the elementwise work around the matmuls (and all of RACS) into fewer kernels.
    The first step of each matrix shape then pays for compilation."""
    global newton_schulz, equilibrate, normuon_normalize, racs, update_scale
    if hasattr(newton_schulz, "_torchdynamo_orig_callable"):  # compiled already
        return
    newton_schulz, equilibrate = torch.compile(newton_schulz), torch.compile(equilibrate)
    normuon_normalize, racs = torch.compile(normuon_normalize), torch.compile(racs)
    update_scale = torch.compile(update_scale)


def stat_dtype(p):
    """The dtype of a parameter's optimizer state and update arithmetic: float32 at least
    (float64 stays float64). bfloat16 keeps 8 bits of mantissa: a running average in it
    stalls, and W*(1 - lr*wd) with lr*wd = 1e-4 rounds back to W."""
    return torch.promote_types(p.dtype, torch.float32)


def matrix_shape(p):
    """The (m, n) a parameter is treated as: rows = output units, columns = the rest.
    An nn.Linear weight (out, in) stays itself; a conv kernel (out, in, kh, kw) becomes
    (out, in*kh*kw), one row per output channel."""
    return p.shape[0], p[0].numel()


# -----------------------------------------------------------------------------
# 2. Routing: which parameters get the matrix rule and which get AdamW
# -----------------------------------------------------------------------------

def param_groups(model, head="auto", adamw_names=(), matrix_names=()):
    """Split a model's parameters into the groups the optimizers in this file expect.

    The rule (the one the Muon references use):
      - tensors with fewer than 2 dims (biases, norm gains)  -> AdamW, no weight decay;
      - nn.Embedding weights                                 -> AdamW;
      - the output head                                      -> AdamW;
      - every other tensor with >= 2 dims (Linear weights, conv kernels) -> the matrix rule.
    The head is, by default ("auto"), the last nn.Linear the model registers (nanoGPT's
    lm_head, a ResNet's fc). Pass `head=` a module, a list of modules or None instead when
    that guess is wrong. A weight tied to the embedding (GPT-2) is one parameter and goes
    to AdamW once. `adamw_names` / `matrix_names` force parameters, by their name in
    model.named_parameters() (or a prefix of it, such as "blocks.0."), into one side.

    Returns a list of param-group dicts; an AdamW group carries `use_adamw=True`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups needs an nn.Module, got {type(model).__name__}")
    if head == "auto":
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1:]
    elif head is None:
        head = []
    elif isinstance(head, nn.Module):
        head = [head]
    to_adamw = {id(p) for m in head for p in m.parameters()}
    to_adamw |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def named(names, name):
        return any(name == n or name.startswith(n.rstrip(".") + ".") for n in names)

    matrix, adamw, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if named(matrix_names, name) and p.ndim >= 2:
            matrix.append(p)
        elif p.ndim < 2:
            no_decay.append(p)
        elif id(p) in to_adamw or named(adamw_names, name):
            adamw.append(p)
        else:
            matrix.append(p)
    groups = [
        dict(params=matrix, use_adamw=False, name="matrix"),
        dict(params=adamw, use_adamw=True, name="adamw"),
        dict(params=no_decay, use_adamw=True, weight_decay=0.0, name="adamw_no_decay"),
    ]
    return [g for g in groups if g["params"]]


# -----------------------------------------------------------------------------
# 3. The optimizers: one skeleton, four directions
# -----------------------------------------------------------------------------

def _check_range(name, value, where, low, high=math.inf, high_open=False):
    """A finite real number in [low, high] (or [low, high)); NaN and inf never pass."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low <= value < high if high_open else low <= value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}{bracket}, "
                         f"got {value!r} {where}")


class MatrixOptimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """The shared skeleton. A subclass supplies `direction`, its `options` (name -> default)
    and their checks; everything else (momentum, Nesterov, scale, weight decay, the AdamW
    part, state) lives here once.

    Param groups: a group with `use_adamw=True` is stepped with AdamW (betas, eps, the
    group's lr and weight_decay); every other group gets the matrix rule and may hold only
    tensors with >= 2 dims. Build groups with `param_groups(model)`.

    Args:
        lr: learning rate, shared by both rules unless a group overrides it (default 1e-3).
        weight_decay: decoupled, multiplied by the unscaled lr (default 0.1).
        momentum: EMA coefficient mu of the momentum buffer (default 0.95).
        nesterov: use the look-ahead (1-mu)*G + mu*B instead of B (default True).
        scale: "rms" (update RMS ~0.2, AdamW's lr carries over) or "spectral" (Keller
            Jordan's sqrt(max(1, m/n)); use lr ~0.02). See `update_scale`.
        betas, eps: the AdamW part's (default (0.9, 0.95), 1e-8).
        **options: the method's own (see each class), e.g. MuonEq(mode="RC").
    """

    options = {}         # the method's own hyperparameters and their defaults
    measure_rms = False  # True where the direction's RMS is not fixed by its shape

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 scale="rms", betas=(0.9, 0.95), eps=1e-8, **options):
        unknown = set(options) - set(self.options)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected option(s) {sorted(unknown)}; "
                            f"its own options are {sorted(self.options) or 'none'}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, scale=scale, betas=betas, eps=eps,
                        use_adamw=False, **{**self.options, **options},
                        fused=True)  # tells load_state_dict to keep AdamW's step on the device
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        """torch.optim's, with the group checked *before* it is added: a rejected group
        leaves the optimizer exactly as it was."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if torch.is_tensor(params) else list(params)
        self._check_group({**self.defaults, **group}, len(self.param_groups))
        super().add_param_group(group)

    def _check_group(self, group, index):
        """Reject bad hyperparameters when the group is made, not deep inside step()."""
        where = f"(param group {index})"
        for key in ("lr", "weight_decay"):
            _check_range(key, group[key], where, 0.0)
        _check_range("momentum", group["momentum"], where, 0.0, 1.0, high_open=True)
        _check_range("eps", group["eps"], where, 0.0)
        for i, beta in enumerate(group["betas"]):
            _check_range(f"betas[{i}]", beta, where, 0.0, 1.0, high_open=True)
        if group["scale"] not in ("rms", "spectral"):
            raise ValueError(f"scale must be 'rms' or 'spectral', got {group['scale']!r} {where}")
        if group["use_adamw"]:
            return
        for p in group["params"]:
            if p.ndim < 2:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is in a matrix group {where}: the "
                    "matrix rule needs >= 2 dims. Build the groups with reg.param_groups(model), "
                    "which sends biases, norms, embeddings and the head to AdamW, or mark the "
                    "group use_adamw=True.")
        self.check_options(group, where)

    def check_options(self, group, where):
        """Subclasses validate their own options here."""

    @abc.abstractmethod
    def direction(self, U, states, group):
        """The one line that differs. U: (k, m, n), the Nesterov momenta of k same-shape
        matrices; states: their k per-parameter state dicts (for methods with state).
        Returns D, (k, m, n)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"a parameter of shape {tuple(p.shape)} has a sparse gradient: "
                        f"{type(self).__name__} needs dense ones (nn.Embedding(sparse=False)).")
                if p.is_complex():
                    raise RuntimeError(
                        f"a parameter of shape {tuple(p.shape)} is complex: "
                        f"{type(self).__name__} supports real parameters only.")
            if params and group["use_adamw"]:
                self._adamw_step(group, params)
            elif params:
                self._matrix_step(group, params)
        return loss

    def _matrix_step(self, group, params):
        lr, mu = group["lr"], group["momentum"]
        # Statistics live in float32 at least, whatever the parameter dtype: a bfloat16
        # running average stalls (its 8-bit mantissa drops most increments).
        grads = [p.grad.to(stat_dtype(p)) for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=stat_dtype(p))
            bufs.append(state["momentum_buffer"])
        torch._foreach_lerp_(bufs, grads, 1 - mu)  # B <- mu*B + (1-mu)*G
        # Matrices of one shape (a transformer has 4 shapes, each once per block) are
        # stacked and handled in one batched call: far fewer, larger kernels on a GPU.
        batches = defaultdict(list)
        for i, p in enumerate(params):
            batches[(matrix_shape(p), p.dtype, p.device)].append(i)
        for ((m, n), dtype, device), idx in batches.items():
            U = torch.empty(len(idx), m, n, device=device, dtype=bufs[idx[0]].dtype)
            for j, i in enumerate(idx):
                if group["nesterov"]:  # U = (1-mu)*G + mu*B, written straight into the batch
                    torch.lerp(grads[i], bufs[i], mu, out=U[j].view_as(grads[i]))
                else:
                    U[j].copy_(bufs[i].reshape(m, n))
            D = self.direction(U, [self.state[params[i]] for i in idx], group)
            D.mul_(update_scale(D, group["scale"], self.measure_rms))  # D is ours: U is a fresh stack
            for j, i in enumerate(idx):
                p, decay = params[i], 1 - lr * group["weight_decay"]
                if p.dtype == D.dtype:
                    p.mul_(decay).add_(D[j].view_as(p), alpha=-lr)
                else:  # decay and step in float32, rounded once: alone, W*(1 - 1e-4) == W in bfloat16
                    p.copy_(p.to(D.dtype).mul_(decay).add_(D[j].view_as(p), alpha=-lr))

    def _adamw_step(self, group, params):
        """AdamW (Loshchilov & Hutter) for the parameters that are not hidden matrices: torch's
        own fused kernel, so this part is exactly what the "adamw" baseline does to them.
        A low-precision parameter is stepped through a float32 copy (state in float32,
        decay and step rounded once), since the fused kernel wants one dtype throughout."""
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if "step" not in state:  # the layout torch.optim.AdamW(fused=True) keeps
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, dtype=stat_dtype(p))
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=stat_dtype(p))
        states = [self.state[p] for p in params]
        work = [p if p.dtype == stat_dtype(p) else p.detach().to(stat_dtype(p)) for p in params]
        adamw_update(
            work, [p.grad.to(w.dtype) for p, w in zip(params, work)], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
            fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)


class Muon(MatrixOptimizer):
    """Muon: the Nesterov momentum, orthogonalized by Newton-Schulz (Keller Jordan, 2024).

    With scale="spectral" this is torch.optim.Muon(adjust_lr_fn="original") and with
    scale="rms" torch.optim.Muon(adjust_lr_fn="match_rms_adamw"), plus an AdamW part for
    the parameters in `use_adamw` groups.
    Options: ns_steps (5), ns_dtype (None: bfloat16 on CUDA, float32 elsewhere).
    """

    options = dict(ns_steps=5, ns_dtype=None)

    def check_options(self, group, where):
        if not isinstance(group["ns_steps"], int) or group["ns_steps"] < 1:
            raise ValueError(f"ns_steps must be an int >= 1, got {group['ns_steps']!r} {where}")

    def orthogonalize(self, U, group):
        return newton_schulz(U, steps=group["ns_steps"], dtype=group["ns_dtype"])

    def direction(self, U, states, group):
        return self.orthogonalize(U, group)


class MuonEq(Muon):
    """MuonEq: equilibrate rows ("R"), columns ("C") or both ("RC"), then Muon
    (arXiv 2603.28254). Balancing happens *before* orthogonalization; no extra state.
    Options: Muon's, and mode ("R", the paper's default for hidden weights)."""

    options = dict(Muon.options, mode="R")

    def check_options(self, group, where):
        super().check_options(group, where)
        if group["mode"] not in ("R", "C", "RC"):
            raise ValueError(f"mode must be 'R', 'C' or 'RC', got {group['mode']!r} {where}")

    def direction(self, U, states, group):
        return self.orthogonalize(equilibrate(U, group["mode"]), group)


class NorMuon(Muon):
    """NorMuon: Muon, then each row divided by its running RMS (arXiv 2510.05491).
    Balancing happens *after* orthogonalization; extra state: one number per row.
    The update is rescaled to RMS exactly 0.2 (scale="rms"), as in the paper; with
    scale="spectral" to the Frobenius norm of a semi-orthogonal matrix, then Keller
    Jordan's factor (the official code restores the norm NS5 gave, which is close to it).
    Options: Muon's, and beta2 (0.95)."""

    options = dict(Muon.options, beta2=0.95)
    measure_rms = True

    def check_options(self, group, where):
        super().check_options(group, where)
        _check_range("beta2", group["beta2"], where, 0.0, 1.0, high_open=True)

    def direction(self, U, states, group):
        O = self.orthogonalize(U, group)
        for s in states:
            if "row_mean_square" not in s:  # in the momentum's dtype: float32 at least
                s["row_mean_square"] = torch.zeros(
                    U.shape[-2], 1, dtype=s["momentum_buffer"].dtype, device=U.device)
        v = torch.stack([s["row_mean_square"] for s in states]).to(O.dtype)
        O_hat, v = normuon_normalize(O, v, group["beta2"])
        for s, v_rows in zip(states, v):
            s["row_mean_square"].copy_(v_rows)
        return O_hat


class REG(MatrixOptimizer):
    """REG: RACS(U) in place of the orthogonalization (arXiv 2510.03691; RACS as we read it,
    see `racs`). Balancing happens *instead of* orthogonalization: no matmul, and the only
    state is the momentum buffer (half of AdamW's). The update is rescaled to RMS exactly 0.2.
    Options: p (2; 1 and math.inf allowed), racs_steps (1)."""

    options = dict(p=2, racs_steps=1)
    measure_rms = True

    def check_options(self, group, where):
        if group["p"] not in (1, 2, math.inf):
            raise ValueError(f"p must be 1, 2 or math.inf, got {group['p']!r} {where}")
        if not isinstance(group["racs_steps"], int) or group["racs_steps"] < 1:
            raise ValueError(f"racs_steps must be an int >= 1, got {group['racs_steps']!r} {where}")

    def direction(self, U, states, group):
        return racs(U, p=group["p"], steps=group["racs_steps"])


# -----------------------------------------------------------------------------
# 4. What the training scripts call: build_optimizer, run grids, sweep summaries
# -----------------------------------------------------------------------------

OPTIMIZERS = {
    "adamw": None,  # torch.optim.AdamW, the baseline (see build_optimizer)
    "muon": (Muon, {}),
    "muoneq-r": (MuonEq, {"mode": "R"}),
    "muoneq-c": (MuonEq, {"mode": "C"}),
    "muoneq-rc": (MuonEq, {"mode": "RC"}),
    "normuon": (NorMuon, {}),
    "reg": (REG, {}),
}


def optimizer_names(spec):
    """A comma list such as "adamw,reg" -> ["adamw", "reg"]; a ValueError names any unknown."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        raise ValueError(f"unknown optimizer {', '.join(unknown) or repr(spec)}; known: {', '.join(OPTIMIZERS)}")
    return names


def parse_grid(optimizers, lrs, seeds):
    """The runs a training script's --optimizer, --lr and --seed ask for: three comma lists
    ("adamw,reg", "1e-3,3e-3", "0,1,2") -> (names, floats, ints), or a ValueError."""
    names = optimizer_names(optimizers)
    try:
        return names, [float(v) for v in lrs.split(",")], [int(v) for v in seeds.split(",")]
    except ValueError as e:
        raise ValueError(f"--lr and --seed take numbers or comma lists of them ({e})") from None


def settings_differences(a, b, ignore=()):
    """Where two runs' argument dicts differ (keys in `ignore` aside), as readable strings:
    runs that differ in more than the optimizer, lr and seed do not belong in one table."""
    keys = sorted((set(a) | set(b)) - set(ignore))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def summarize_sweep(runs, metric, lower_is_better=True):
    """Learning-rate sweeps with seeds, summarized for a results table.

    runs: dicts with "optimizer", "lr", "seed" and `metric`. Returns one dict per
    (optimizer, lr): n (seeds), mean, std (sample standard deviation; 0 for one seed),
    best (this lr is the optimizer's best) and edge (the best lr is the smallest or largest
    tried, so the sweep should be widened).

    The best lr is chosen on the seeds that every lr of that optimizer ran (the sweep's),
    not on the mean at the winner: extra seeds run at the winner afterwards must not be
    able to change which lr wins.
    """
    by_cell = {}
    for r in runs:
        by_cell.setdefault((r["optimizer"], r["lr"]), {})[r["seed"]] = r[metric]
    table = []
    for name in dict.fromkeys(r["optimizer"] for r in runs):  # first-seen order
        lrs = sorted(lr for (n, lr) in by_cell if n == name)
        shared = set.intersection(*(set(by_cell[name, lr]) for lr in lrs))
        sign = 1 if lower_is_better else -1
        best = min(lrs, key=lambda lr: sign * sum(by_cell[name, lr][s] for s in shared))
        for lr in lrs:
            values = list(by_cell[name, lr].values())
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
            table.append(dict(optimizer=name, lr=lr, n=len(values), mean=mean, std=std,
                              best=lr == best, edge=lr == best and len(lrs) > 1 and lr in (lrs[0], lrs[-1])))
    return table


def pyplot(figure):
    """matplotlib.pyplot, drawing to files; None (with a note naming `figure`) when
    matplotlib is not installed, since the plots are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib is not installed: no {figure}; pip install matplotlib for it)")
        return None
    return plt


def save_figure(plt, fig, path):
    """Write a finished figure to path (and say where), then free it: pyplot keeps every
    open figure alive until it is closed."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def write_csv(rows, path):
    """rows (dicts with the same keys) -> a CSV file, written atomically: a reader, or a
    second sweep writing into the same folder, sees the old file or the new one, never a
    mix. The temporary name carries the process id so that two writers cannot collide."""
    keys = list(rows[0])
    lines = [",".join(keys)] + [",".join(str(row[k]) for k in keys) for row in rows]
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def write_sweep(table, folder, metric_label, value_format="{:.4f}"):
    """Print a summarize_sweep table and write it to folder/sweep.csv, and (with
    matplotlib) folder/sweep.png: the metric against lr, one line per optimizer, error bars
    of one standard deviation where there are several seeds, the best lr ringed."""
    folder = Path(folder)
    print(f"\n{'optimizer':<11}{'lr':>9}{'seeds':>6}  {metric_label} (mean +- std)")
    for row in table:
        value = f"{value_format.format(row['mean'])} +- {value_format.format(row['std'])}"
        flag = "  best" + (" (at the edge of the grid: widen it)" if row["edge"] else "") if row["best"] else ""
        print(f"{row['optimizer']:<11}{row['lr']:>9.3g}{row['n']:>6}  {value}{flag}")
    write_csv(table, folder / "sweep.csv")
    plt = pyplot("sweep.png")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(row["optimizer"] for row in table):
        rows = [row for row in table if row["optimizer"] == name]
        line = ax.errorbar([r["lr"] for r in rows], [r["mean"] for r in rows],
                           yerr=[r["std"] for r in rows], marker=".", capsize=3, label=name)
        best = next(r for r in rows if r["best"])
        ax.plot(best["lr"], best["mean"], "o", mfc="none", ms=10, color=line[0].get_color())
    if all(row["lr"] > 0 for row in table):
        ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(f"{metric_label} (ring: best lr)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(plt, fig, folder / "sweep.png")


def build_optimizer(name, model, lr=1e-3, weight_decay=0.1, **kw):
    """Make the optimizer called `name` for `model` (an nn.Module, routed by param_groups,
    or a list of param groups made earlier). Extra keyword args go to the optimizer.

    "adamw" is torch.optim.AdamW on the same groups, with betas (0.9, 0.95) and no weight
    decay on tensors with < 2 dims, so that it differs from the others only in the rule
    used for the hidden matrices.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    # Copies: torch.optim writes its defaults into the group dicts it is given.
    groups = param_groups(model) if isinstance(model, nn.Module) else [dict(g) for g in model]
    if name == "adamw":
        kw.setdefault("betas", (0.9, 0.95))
        for key in ("momentum", "nesterov", "scale"):
            if key in kw:
                raise ValueError(f"{key!r} is not an AdamW option (it belongs to the matrix rules)")
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **kw)
    cls, fixed = OPTIMIZERS[name]
    return cls(groups, lr=lr, weight_decay=weight_decay, **{**fixed, **kw})


# -----------------------------------------------------------------------------
# 5. Benchmark: step time and optimizer-state bytes, side by side in one process
# -----------------------------------------------------------------------------

def gpt2_small_params(blocks=12, width=768, vocab=50257, context=1024, device="cpu",
                      dtype=torch.float32):
    """A GPT-2-small-shaped parameter set with random gradients, as a tiny nn.Module:
    per block attention qkv (2304, 768) and proj (768, 768), MLP fc (3072, 768) and proj
    (768, 3072), two LayerNorms; the token embedding (tied to the head, as in GPT-2),
    the position embedding and the final LayerNorm."""
    model = nn.Module()
    model.wte = nn.Embedding(vocab, width)
    model.wpe = nn.Embedding(context, width)
    model.blocks = nn.ModuleList()
    for _ in range(blocks):
        block = nn.Module()
        block.ln_1, block.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        block.qkv = nn.Linear(width, 3 * width, bias=False)
        block.attn_proj = nn.Linear(width, width, bias=False)
        block.fc = nn.Linear(width, 4 * width, bias=False)
        block.mlp_proj = nn.Linear(4 * width, width, bias=False)
        model.blocks.append(block)
    model.ln_f = nn.LayerNorm(width)
    model.lm_head = nn.Linear(width, vocab, bias=False)
    model.lm_head.weight = model.wte.weight
    model.to(device=device, dtype=dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def state_bytes(optimizer):
    return sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for t in s.values() if torch.is_tensor(t))


def time_steps(optimizer, device, steps, warmup):
    """Median seconds per optimizer.step() after `warmup` steps."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        optimizer.step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        optimizer.step()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def fastest_adamw(model, device, steps, warmup):
    """torch.optim.AdamW in its fastest form on this device: for-loop, foreach or fused."""
    best = None
    for form in ("forloop", "foreach", "fused"):
        kw = {"foreach": False} if form == "forloop" else {form: True}
        try:
            opt = build_optimizer("adamw", model, **kw)
            t = time_steps(opt, device, steps, warmup)
        except (RuntimeError, ValueError):  # fused is not built for every device/dtype
            continue
        if best is None or t < best[1]:
            best = (form, t, state_bytes(opt))
    return best


def benchmark(device="cpu", dtype=torch.float32, blocks=12, steps=5, warmup=2,
              compile_math=False, torch_muon_blocks=None):
    """Print, per optimizer, seconds per step and state bytes as ratios to torch.optim.AdamW
    on a GPT-2-small-shaped parameter set; Muon also against torch.optim.Muon."""
    if compile_math:
        use_compiled_math()
    model = gpt2_small_params(blocks, device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    n_matrix = sum(p.numel() for g in param_groups(model) if not g["use_adamw"] for p in g["params"])
    print(f"device {device}, dtype {str(dtype).replace('torch.', '')}, {blocks} blocks: "
          f"{n_params / 1e6:.1f}M params ({n_matrix / 1e6:.1f}M in hidden matrices), "
          f"NS in {str(default_ns_dtype(device)).replace('torch.', '')}, "
          f"compile={compile_math}, median of {steps} steps after {warmup} warm-up")
    form, t_adamw, bytes_adamw = fastest_adamw(model, device, steps, warmup)
    print(f"{'optimizer':<22}{'ms/step':>10}{'x AdamW':>9}{'state MB':>10}{'x AdamW':>9}")
    print(f"{'torch AdamW (' + form + ')':<22}{t_adamw * 1e3:>10.1f}{1:>9.2f}"
          f"{bytes_adamw / 2**20:>10.1f}{1:>9.2f}")
    results = {}
    for name in ("reg", "muon", "muoneq-r", "muoneq-rc", "normuon"):
        opt = build_optimizer(name, model)
        t = time_steps(opt, device, steps, warmup)
        b = state_bytes(opt)
        results[name] = t
        print(f"{name:<22}{t * 1e3:>10.1f}{t / t_adamw:>9.2f}{b / 2**20:>10.1f}{b / bytes_adamw:>9.2f}")
    for name in ("muoneq-r", "muoneq-rc", "normuon"):
        print(f"{name} / muon step time: {results[name] / results['muon']:.3f}")

    # torch.optim.Muon handles only 2-D matrices: compare on the hidden matrices alone,
    # with the same lr rule. Its Newton-Schulz always runs in bfloat16, which on a CPU is
    # tens of times slower, so there it is also compared with ours forced to bfloat16 and,
    # to keep the run short, on fewer blocks.
    sub_blocks = torch_muon_blocks or blocks
    sub = gpt2_small_params(sub_blocks, device=device, dtype=dtype)
    matrices = [p for g in param_groups(sub) if not g["use_adamw"] for p in g["params"]]
    ref = torch.optim.Muon(matrices, adjust_lr_fn="match_rms_adamw")
    t_ref = time_steps(ref, device, steps, warmup)
    print(f"hidden matrices of {sub_blocks} block(s): torch.optim.Muon {t_ref * 1e3:.1f} ms/step")
    for ns_dtype in dict.fromkeys([None, torch.bfloat16]):
        ours = Muon([dict(params=matrices)], ns_dtype=ns_dtype)
        t = time_steps(ours, device, steps, warmup)
        label = str(ns_dtype or default_ns_dtype(device)).replace("torch.", "")
        print(f"  reg.Muon, NS in {label}: {t * 1e3:.1f} ms/step = {t / t_ref:.3f} x torch.optim.Muon")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="parameter dtype")
    parser.add_argument("--blocks", type=int, default=12, help="transformer blocks (GPT-2 small: 12)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--compile", action="store_true", help="torch.compile the math (use_compiled_math)")
    parser.add_argument("--torch-muon-blocks", type=int, default=None,
                        help="blocks for the torch.optim.Muon comparison (default: --blocks)")
    args = parser.parse_args()
    torch.manual_seed(0)
    benchmark(args.device, getattr(torch, args.dtype), args.blocks, args.steps, args.warmup,
              args.compile, args.torch_muon_blocks)
