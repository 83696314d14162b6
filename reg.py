"""
reg.py: matrix-aware optimizers side by side, in one file that reads top to bottom.

    import reg
    opt = reg.build_optimizer("reg", model, lr=1e-3)   # or "muon", "muoneq-r", "normuon", ...

Muon, MuonEq, NorMuon and REG treat a weight matrix as a matrix rather than a bag of
numbers. For a hidden weight W (m x n) with gradient G they all take the same step; only
the *direction* differs (AdamW, per coordinate, is the baseline):

    B  <- mu*B + (1-mu)*G                 momentum (EMA form), mu = 0.95
    U  =  (1-mu)*G + mu*B                 Nesterov look-ahead (U = B without it)
    D  =  direction(U)                    <- the only line that differs
    W  <- W*(1 - lr*wd) - lr*scale(D)*D   decoupled weight decay, update RMS ~0.2

    method           direction(U)                      where the balancing happens
    Muon             NS5(U)                            none: orthogonalize
    MuonEq R/C/RC    NS5(equilibrate(U))               before orthogonalization
    NorMuon          rownorm(NS5(U)), per-row 2nd mom. after orthogonalization
    REG              RACS(U)                           instead of orthogonalization

A hidden layer's momentum is typically very ill-conditioned: a few directions carry almost
all of its energy, so a plain or Adam-style step moves the weights mostly along those few.
Muon (Keller Jordan, 2024) replaces it by its nearest semi-orthogonal matrix, so every
direction moves equally. MuonEq (arXiv 2603.28254) balances rows and/or columns first;
NorMuon (arXiv 2510.05491) evens out the rows' step sizes afterwards; REG (arXiv
2510.03691) balances gently *instead* (RACS: our reading of it, see `racs`). The update
is scaled to an AdamW-like RMS of 0.2 (Moonlight, arXiv 2502.16982), so AdamW's learning
rate carries over. Embeddings, the head, biases and norm gains get AdamW inside the same
optimizer, as Keller Jordan's MuonWithAuxAdam does (`param_groups` does the split).

The file: (1) the math, small pure functions on (..., m, n) tensors; (2) routing
parameters into groups; (3) the optimizers: one `step` holding the whole update, four
directions. CPU or CUDA. Under DistributedDataParallel the gradients are
already averaged across processes when `step` runs, so every process takes the same step.
"""

import math
import warnings
from collections import defaultdict

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
    """bfloat16 on CUDA, as the references do: fast, and accurate enough for a direction.
    float32 on a CPU, where bfloat16's speed depends on the chip (faster with avx512_bf16
    or AMX, far slower without) and float32 keeps results independent of it."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def newton_schulz(G, steps=5, eps=1e-7, dtype=None):
    """Approximately orthogonalize G: return ~U V^T where G = U S V^T (Keller Jordan's NS5).

    X is first divided by its Frobenius norm, which bounds the spectral norm by 1; each
    step then applies the odd polynomial p(x) = a x + b x^3 + c x^5 to every singular value
    at once, via X <- a X + (b A + c A A) X with A = X X^T, pushing all of them towards 1.

    Caveats: these coefficients overshoot on purpose, so the output's singular values land
    roughly in [0.7, 1.2], not at 1 (Muon's authors found this does not hurt training).
    And 5 steps lift a singular value by at most a^5 ~ 490: those below ~1.3e-3 * ||G||_F
    come out below 0.6 (measured), so a very ill-conditioned G is only partly orthogonalized.
    The result does not depend on the scale of G as long as ||G||_F > eps; below that the
    output shrinks with G (as in torch.optim.Muon, whose eps this is).

    G: (..., m, n); a leading batch dimension orthogonalizes same-shape matrices in one call.
    dtype: compute dtype; None means default_ns_dtype(G.device). Returns G's dtype.
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

    The guard is relative, eps_r = eps * mean(r) (likewise c), so the result does not
    depend on the scale of U (RC's scales as 1/scale, which NS's normalization removes).
    The paper's code adds an absolute 1e-8 to a sum-form momentum (20x ours): on our EMA
    momentum, whose rows sum to 1e-12..1e-11 late in a GPT-2-sized run, that would swamp
    the rows and quietly turn MuonEq back into Muon. U is divided by its largest |entry|
    first, in float32 at least, so the squares neither underflow nor overflow. Zero rows
    stay zero.
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

    What the paper makes public: RACS replaces Muon's matrix sign, is "grounded in
    balancing a matrix" (its Theorem 1: equal row norms minimize a condition number over
    diagonal scalings), is gentler than the matrix sign, has a norm parameter p (p = 2 best)
    and REG normalizes the update's RMS. Ours is one step of Ruiz-style two-sided
    balancing: it takes roughly the square root of the row norms' and the column norms'
    spread (max/min), damping a dominant row or column without flattening the spectrum.
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


def update_scale(D, scale="rms", exact_rms=False):
    """The factor the direction D (..., m, n) is multiplied by before lr.

    scale="rms" (default, Moonlight): make the update's RMS ~0.2, the typical RMS of an
    AdamW update, so AdamW's learning rate and weight decay carry over.
    scale="spectral" (Keller Jordan): sqrt(max(1, m/n)) on an orthogonal direction; Muon's
    usual lr is then ~0.02.

    Muon's direction is (nearly) semi-orthogonal, so its RMS is 1/sqrt(max(m, n)) and the
    factor 0.2*sqrt(max(m, n)) or sqrt(max(1, m/n)): torch.optim.Muon's "match_rms_adamw"
    and "original". NorMuon's and REG's directions have no fixed RMS: `exact_rms=True`
    first rescales D to a semi-orthogonal matrix's RMS, making the "rms" update's RMS
    exactly 0.2. A zero direction gives a zero step, never NaN.
    """
    m, n = D.shape[-2:]
    factors = {"rms": 0.2 * math.sqrt(max(m, n)), "spectral": math.sqrt(max(1.0, m / n))}
    if scale not in factors:
        raise ValueError(f"scale must be 'rms' or 'spectral', got {scale!r}")
    factor = factors[scale]
    if not exact_rms:
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


def matrix_shape(p):
    """The (m, n) a parameter is treated as: rows = output units, columns = the rest.
    An nn.Linear weight (out, in) stays itself; a conv kernel (out, in, kh, kw) becomes
    (out, in*kh*kw), one row per output channel."""
    return p.shape[0], p[0].numel()


def stat_dtype(p):
    """The dtype of a parameter's optimizer state and update arithmetic: float32 at least.
    In bfloat16 (8 bits of mantissa) a running average stalls and W*(1 - 1e-4) rounds
    back to W. A bfloat16 weight still loses every step below ~0.2% of its value: keep
    float32 weights under autocast, as the training scripts do."""
    return torch.promote_types(p.dtype, torch.float32)


def use_compiled_math():
    """Swap the functions above for torch.compile'd versions, which every optimizer then
    looks up by name: mostly a CUDA win (the elementwise work around the matmuls, and all
    of RACS, fused into fewer kernels). Each matrix shape's first step pays for compiling."""
    global newton_schulz, equilibrate, normuon_normalize, racs, update_scale
    if not hasattr(newton_schulz, "_torchdynamo_orig_callable"):  # not compiled already
        newton_schulz, equilibrate, normuon_normalize, racs, update_scale = map(
            torch.compile, (newton_schulz, equilibrate, normuon_normalize, racs, update_scale))


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

    Returns param-group dicts with `use_adamw`, a `name` and `param_names` (torch.optim's
    key for them); `describe_groups` prints what went where."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups needs an nn.Module, got {type(model).__name__}")
    if head == "auto":
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    head = [head] if isinstance(head, nn.Module) else list(head or [])
    to_adamw = {id(p) for m in head for p in m.parameters()}
    to_adamw |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def named(names, name):
        return any(name == n or name.startswith(n.rstrip(".") + ".") for n in names)

    sides = {"matrix": [], "adamw": [], "adamw_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            side = "adamw_no_decay"
        elif (id(p) in to_adamw or named(adamw_names, name)) and not named(matrix_names, name):
            side = "adamw"
        else:
            side = "matrix"
        sides[side].append((name, p))
    extra = {"matrix": dict(use_adamw=False), "adamw": dict(use_adamw=True),
             "adamw_no_decay": dict(use_adamw=True, weight_decay=0.0)}
    return [dict(params=[p for _, p in named_params], param_names=[n for n, _ in named_params],
                 name=side, **extra[side])
            for side, named_params in sides.items() if named_params]


def as_param_groups(params):
    """What a torch user passes, as param groups: an nn.Module (routed by `param_groups`),
    a list of param-group dicts (copied: torch.optim writes its defaults into them), or an
    iterable of tensors (routed by shape alone, with a warning: embeddings and the head
    cannot be told from hidden matrices without the module)."""
    if isinstance(params, nn.Module):
        return param_groups(params)
    params = list(params) if not torch.is_tensor(params) else [params]
    if params and all(isinstance(g, dict) for g in params):
        return [dict(g) for g in params]
    if not params or not all(torch.is_tensor(p) for p in params):
        kinds = sorted({type(p).__name__ for p in params}) or ["nothing"]
        raise TypeError(f"expected an nn.Module, a list of param-group dicts or tensors, got "
                        f"{', '.join(kinds)}: pass the model itself, e.g. build_optimizer(name, model)")
    warnings.warn("parameters given without their module are routed by shape alone: every "
                  "tensor with >= 2 dims gets the matrix rule, embeddings and the head included. "
                  "Pass the nn.Module (or reg.param_groups(model)) to send those to AdamW.",
                  stacklevel=3)
    groups = [dict(params=[p for p in params if p.ndim >= 2], use_adamw=False, name="matrix"),
              dict(params=[p for p in params if p.ndim < 2], use_adamw=True, weight_decay=0.0,
                   name="adamw_no_decay")]
    return [g for g in groups if g["params"]]


def describe_groups(groups, max_names=6):
    """One line per param group: its rule, size and first parameter names and shapes, to
    check where a model's weights went (param_groups(model), or opt.param_groups)."""
    lines = []
    for g in groups:
        names = g.get("param_names") or ["?"] * len(g["params"])
        named = [f"{n} {tuple(p.shape)}" for n, p in zip(names, g["params"])]
        lines.append(f"{g.get('name', 'group')} ({'AdamW' if g.get('use_adamw') else 'matrix rule'}): "
                     f"{len(named)} tensors, {sum(p.numel() for p in g['params']):,} numbers: "
                     + ", ".join(named[:max_names]) + (", ..." if len(named) > max_names else ""))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 3. The optimizers: one step for the whole family, four directions
# -----------------------------------------------------------------------------

def finite_in(low, high=math.inf, high_open=False):
    """A check that a value is a finite real number in [low, high] (or [low, high))."""
    def ok(x):
        real = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        return real and (low <= x < high if high_open else low <= x <= high)
    return ok, f"a finite number in [{low:g}, {high:g}{')' if high_open else ']'}"


def one_of(*choices):
    return (lambda x: x in choices), " or ".join(map(repr, choices))


AN_INT_ABOVE_0 = (lambda n: isinstance(n, int) and not isinstance(n, bool) and n >= 1), "an int >= 1"
# What every hyperparameter must be, checked when a param group is added (never inside
# step(), where a NaN lr would silently turn the weights into NaN).
HYPERPARAMETERS = {
    "lr": finite_in(0), "weight_decay": finite_in(0), "eps": finite_in(0),
    "betas": ((lambda b: isinstance(b, (tuple, list)) and len(b) == 2), "a pair (beta1, beta2)"),
    "momentum": finite_in(0, 1, True), "betas[0]": finite_in(0, 1, True),
    "betas[1]": finite_in(0, 1, True), "beta2": finite_in(0, 1, True),
    "scale": one_of("rms", "spectral"), "mode": one_of("R", "C", "RC"),
    "p": one_of(1, 2, math.inf), "ns_steps": AN_INT_ABOVE_0, "racs_steps": AN_INT_ABOVE_0,
}


def check_hyperparameters(group, where):
    betas = group.get("betas") if isinstance(group.get("betas"), (tuple, list)) else ()
    values = {**group, **{f"betas[{i}]": b for i, b in enumerate(betas)}}
    for key, (ok, what) in HYPERPARAMETERS.items():
        if key in values and not ok(values[key]):
            raise ValueError(f"{key} must be {what}, got {values[key]!r} {where}")


class MatrixOptimizer(torch.optim.Optimizer):
    """The shared skeleton: `step` below is the whole update, and a method supplies only
    its `direction` (and its own options, with their defaults, in `method_defaults`).

    A param group with `use_adamw=True` is stepped with AdamW (betas, eps, the group's lr
    and weight_decay); every other group gets the matrix rule and holds only tensors with
    >= 2 dims. `params`: an nn.Module, param-group dicts or tensors (`as_param_groups`).
    lr (1e-3) and weight_decay (0.1, decoupled, times the unscaled lr) serve both rules;
    momentum (0.95) is the EMA coefficient mu; nesterov (True) uses the look-ahead;
    scale "rms" gives updates of RMS ~0.2 (AdamW's lr carries over), "spectral" Keller
    Jordan's sqrt(max(1, m/n)) (use lr ~0.02); betas (0.9, 0.95) and eps (1e-8) are the
    AdamW part's. State is float32 at least (`stat_dtype`). Every matrix rule is invariant
    to the scale of the gradients, down to Newton-Schulz's floor (||U||_F > 1e-7)."""

    method_defaults = {}  # the method's own options and their defaults
    exact_rms = False     # rescale to RMS exactly 0.2: for directions whose RMS varies

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 scale="rms", betas=(0.9, 0.95), eps=1e-8, **options):
        unknown = set(options) - set(self.method_defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected option(s) {sorted(unknown)}; "
                            f"its own options are {sorted(self.method_defaults) or 'none'}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, scale=scale, betas=betas, eps=eps,
                        use_adamw=False, **{**self.method_defaults, **options},
                        fused=True)  # tells load_state_dict to keep AdamW's step on the device
        super().__init__(as_param_groups(params), defaults)
        if not any(p.ndim >= 2 for g in self.param_groups if not g["use_adamw"] for p in g["params"]):
            warnings.warn(f"{type(self).__name__} received no hidden matrices: every parameter "
                          f"gets AdamW. Routing:\n{describe_groups(self.param_groups)}\n"
                          "(param_groups takes the last nn.Linear as the head: pass head=None "
                          "or matrix_names=[...] to put weights under the matrix rule)", stacklevel=2)

    def add_param_group(self, param_group):
        """torch.optim's, with the group checked *before* it is added: a rejected group
        leaves the optimizer exactly as it was."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        group = dict(param_group, params=[params] if torch.is_tensor(params) else list(params))
        where = f"(param group {len(self.param_groups)})"
        check_hyperparameters({**self.defaults, **group}, where)
        for p in [] if group.get("use_adamw", self.defaults["use_adamw"]) else group["params"]:
            if p.ndim < 2:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is in a matrix group {where}: the "
                    "matrix rule needs >= 2 dims. Build the groups with reg.param_groups(model), "
                    "which sends biases, norms, embeddings and the head to AdamW, or mark the "
                    "group use_adamw=True.")
        super().add_param_group(group)

    def direction(self, U, states, group):
        """The one line that differs. U: (k, m, n), the look-ahead momenta of k same-shape
        matrices; states: their k per-parameter state dicts (for methods with state).
        Returns D, (k, m, n)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            check_gradients(params, type(self).__name__)
            if not params:
                continue
            if group["use_adamw"]:
                self.adamw_step(group, params)
                continue
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for batch in same_shape_batches(params):  # k matrices of one shape, one call each
                (m, n), k = matrix_shape(batch[0]), len(batch)
                G = [p.grad.to(stat_dtype(p)) for p in batch]
                for p in batch:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=stat_dtype(p))
                B = [self.state[p]["momentum_buffer"] for p in batch]
                torch._foreach_lerp_(B, G, 1 - mu)                        # B <- mu*B + (1-mu)*G
                U = torch.stack([torch.lerp(g, b, mu) if group["nesterov"] else b
                                 for g, b in zip(G, B)]).reshape(k, m, n)  # (1-mu)*G + mu*B
                D = self.direction(U, [self.state[p] for p in batch], group)
                D = D * update_scale(D, group["scale"], self.exact_rms)
                for p, d in zip(batch, D):                                # W*(1-lr*wd) - lr*D
                    decay_and_step(p, d.view_as(p), lr, wd)
        return loss

    def adamw_step(self, group, params):
        """AdamW (Loshchilov & Hutter) for the parameters that are not hidden matrices: torch's
        own fused kernel, so this part is exactly what the "adamw" baseline does to them.
        A low-precision parameter is stepped through a float32 copy (state in float32,
        decay and step rounded once), since the fused kernel wants one dtype throughout."""
        for p in params:
            state = self.state[p]
            if "step" not in state:  # the layout torch.optim.AdamW(fused=True) keeps
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, dtype=stat_dtype(p))
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=stat_dtype(p))
        states = [self.state[p] for p in params]
        work = [p if p.dtype == stat_dtype(p) else p.detach().to(stat_dtype(p)) for p in params]
        beta1, beta2 = group["betas"]
        adamw_update(
            work, [p.grad.to(w.dtype) for p, w in zip(params, work)], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
            fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)


def check_gradients(params, who):
    for p in params:
        problem = "has a sparse gradient" if p.grad.is_sparse else "is complex" if p.is_complex() else None
        if problem:
            raise RuntimeError(f"a parameter of shape {tuple(p.shape)} {problem}: {who} needs "
                               "dense, real ones (nn.Embedding(sparse=False), real dtypes)")


def same_shape_batches(params):
    """Matrices of one shape, dtype and device, to be stacked and handled in one batched
    call (a transformer has 4 shapes, each once per block): far fewer, larger kernels."""
    batches = defaultdict(list)
    for p in params:
        batches[(matrix_shape(p), p.dtype, p.device)].append(p)
    return list(batches.values())


def decay_and_step(p, D, lr, weight_decay):
    """W <- W*(1 - lr*wd) - lr*D, in D's dtype (float32 at least) and rounded to W's once:
    in bfloat16 the decay alone would round away (W*(1 - 1e-4) == W)."""
    if p.dtype == D.dtype:
        p.mul_(1 - lr * weight_decay).add_(D, alpha=-lr)
    else:
        p.copy_(p.to(D.dtype).mul_(1 - lr * weight_decay).add_(D, alpha=-lr))


class Muon(MatrixOptimizer):
    """Muon: the look-ahead momentum, orthogonalized by Newton-Schulz (Keller Jordan, 2024).
    With scale="spectral" this is torch.optim.Muon(adjust_lr_fn="original"), with scale="rms"
    torch.optim.Muon(adjust_lr_fn="match_rms_adamw"), plus an AdamW part for `use_adamw`
    groups. Options: ns_steps (5), ns_dtype (None: bfloat16 on CUDA, float32 elsewhere)."""

    method_defaults = dict(ns_steps=5, ns_dtype=None)

    def direction(self, U, states, group):
        return newton_schulz(U, steps=group["ns_steps"], dtype=group["ns_dtype"])


class MuonEq(Muon):
    """MuonEq: equilibrate rows ("R"), columns ("C") or both ("RC"), then Muon
    (arXiv 2603.28254). Balancing happens *before* orthogonalization; no extra state.
    Options: Muon's, and mode ("R", the paper's default for hidden weights)."""

    method_defaults = dict(Muon.method_defaults, mode="R")

    def direction(self, U, states, group):
        return newton_schulz(equilibrate(U, group["mode"]), steps=group["ns_steps"], dtype=group["ns_dtype"])


class NorMuon(Muon):
    """NorMuon: Muon, then each row divided by its running RMS (arXiv 2510.05491).
    Balancing happens *after* orthogonalization; extra state: one number per row.
    The update is rescaled to RMS exactly 0.2 (scale="rms"), as in the paper; with
    scale="spectral" to the Frobenius norm of a semi-orthogonal matrix, then Keller
    Jordan's factor (the official code restores the norm NS5 gave, which is close to it).
    Options: Muon's, and beta2 (0.95)."""

    method_defaults = dict(Muon.method_defaults, beta2=0.95)
    exact_rms = True

    def direction(self, U, states, group):
        O = newton_schulz(U, steps=group["ns_steps"], dtype=group["ns_dtype"])
        for s in states:  # one running mean square per row, in the momentum's dtype
            if "row_mean_square" not in s:
                s["row_mean_square"] = torch.zeros(U.shape[-2], 1, dtype=U.dtype, device=U.device)
        O_hat, v = normuon_normalize(O, torch.stack([s["row_mean_square"] for s in states]), group["beta2"])
        for s, v_rows in zip(states, v):
            s["row_mean_square"].copy_(v_rows)
        return O_hat


class REG(MatrixOptimizer):
    """REG: RACS(U) in place of the orthogonalization (arXiv 2510.03691; RACS as we read it,
    see `racs`). Balancing happens *instead of* orthogonalization: no matmul, and the only
    state is the momentum buffer (half of AdamW's). The update is rescaled to RMS exactly 0.2.
    Options: p (2; 1 and math.inf allowed), racs_steps (1)."""

    method_defaults = dict(p=2, racs_steps=1)
    exact_rms = True

    def direction(self, U, states, group):
        return racs(U, p=group["p"], steps=group["racs_steps"])


OPTIMIZERS = {
    "adamw": None,  # torch.optim.AdamW, the baseline (see build_optimizer)
    "muon": (Muon, {}),
    "muoneq-r": (MuonEq, {"mode": "R"}),
    "muoneq-c": (MuonEq, {"mode": "C"}),
    "muoneq-rc": (MuonEq, {"mode": "RC"}),
    "normuon": (NorMuon, {}),
    "reg": (REG, {}),
}


def build_optimizer(name, params, lr=1e-3, weight_decay=0.1, **kw):
    """The optimizer called `name` (see OPTIMIZERS) for `params`: an nn.Module (routed by
    param_groups), param-group dicts, or tensors (routed by shape alone, with a warning).
    Extra keyword args go to the optimizer. "adamw" is torch.optim.AdamW on the same groups,
    betas (0.9, 0.95), no decay on tensors with < 2 dims: it differs from the others only
    in the rule for the hidden matrices."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    if name != "adamw":
        cls, fixed = OPTIMIZERS[name]
        return cls(params, lr=lr, weight_decay=weight_decay, **{**fixed, **kw})
    for key in ("momentum", "nesterov", "scale"):
        if key in kw:
            raise ValueError(f"{key!r} is not an AdamW option (it belongs to the matrix rules)")
    check_hyperparameters(dict(kw, lr=lr, weight_decay=weight_decay), "(adamw)")
    with warnings.catch_warnings():  # shape routing is right for AdamW: nothing to warn
        warnings.simplefilter("ignore")
        groups = as_param_groups(params)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **{"betas": (0.9, 0.95), **kw})
