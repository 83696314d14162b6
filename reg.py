"""
reg.py: matrix-aware optimizers side by side, in one file that reads top to bottom.

    import reg
    opt = reg.build_optimizer("reg", model, lr=1e-3)   # or "muon", "muoneq-r", "normuon", "rmnp", ...

Muon, MuonEq, NorMuon, REG and RMNP treat a weight matrix as a matrix rather than a bag
of numbers. For a hidden weight W (m x n) with gradient G they all take the same step;
only the *direction* differs (AdamW, per coordinate, is the baseline):

    B  <- mu*B + (1-mu)*G                 momentum (EMA form), mu = 0.95
    U  =  (1-mu)*G + mu*B                 Nesterov look-ahead (U = B without it)
    D  =  direction(U)                    <- the only line that differs
    W  <- W*(1 - lr*wd) - lr*scale(D)*D   decoupled weight decay, update RMS ~0.2

    method           direction(U)                      where the balancing happens
    Muon             NS5(U)                            none: orthogonalize
    MuonEq R/C/RC    NS5(equilibrate(U))               before orthogonalization
    NorMuon          rownorm(NS5(U)), per-row 2nd mom. after orthogonalization
    REG              RACS(U)                           instead of orthogonalization
    RMNP             rownorm(U)                        instead of orthogonalization

A hidden layer's momentum is typically very ill-conditioned: a few directions carry almost
all of its energy, so a plain or Adam-style step moves the weights mostly along those few.
Muon (Keller Jordan, 2024) replaces it by its nearest semi-orthogonal matrix, so every
direction moves equally. MuonEq (arXiv 2603.28254) balances rows and/or columns first;
NorMuon (arXiv 2510.05491) evens out the rows' step sizes afterwards; REG (arXiv
2510.03691) balances gently *instead* (RACS: our reading of it, see `racs`), and RMNP
(arXiv 2603.20527) by normalizing each row. The update is scaled to an AdamW-like RMS of
0.2 (Moonlight, arXiv 2502.16982), so AdamW's learning rate carries over. Embeddings, the
head, biases and norm gains get AdamW inside the same optimizer, as Keller Jordan's
MuonWithAuxAdam does (`param_groups` does the split).

Three options the current record code bases use stack on top: Newton-Schulz with one
(a, b, c) per step (`ns_coefficients="polar_express"`, arXiv 2505.16932), cautious weight
decay (`cautious_wd=True`: decay only where it agrees with the step) and NorMuon after
MuonEq's equilibration (`mode="R"`): together, nanochat's recipe (see NorMuon).

The file: (1) the math, small pure functions on (..., m, n) tensors; (2) routing
parameters into groups; (3) the optimizers: one `step` holding the whole update, five
directions; (4) a look inside them (`inspect_matrix`). CPU or CUDA. Under DistributedDataParallel the gradients are
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

# Keller Jordan's quintic coefficients, used at every step: chosen to make the slope at
# zero as steep as possible (small singular values grow fast) at the price of not
# converging exactly to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel, Persson, Musco & Gower, arXiv 2505.16932): one (a, b, c) per step,
# each the odd quintic that is best in the worst case on the interval the steps before it
# left the singular values in, so the early steps are steep and the last ones converge.
# These five (fit for 5 steps with a safety factor, in bfloat16) are the ones
# modded-nanogpt's record optimizer, nanochat and dion use.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# With a per-step schedule X is divided by this much more than ||X||_F (see newton_schulz).
SCHEDULE_MARGIN = 1.02


def is_triple(c):
    return (isinstance(c, (tuple, list)) and len(c) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in c))


def ns_schedule(coefficients, steps):
    """The (a, b, c) of each of `steps` Newton-Schulz steps, from one triple (used at every
    step), a sequence of triples (one per step; past its end the last one repeats, as in
    the Polar Express code) or the name "polar_express"."""
    if isinstance(coefficients, str) and coefficients == "polar_express":
        coefficients = POLAR_EXPRESS
    if is_triple(coefficients):
        return [tuple(coefficients)] * steps
    if (isinstance(coefficients, (tuple, list)) and coefficients
            and all(is_triple(c) for c in coefficients)):
        return [tuple(c) for c in coefficients[:steps]] + [tuple(coefficients[-1])] * (steps - len(coefficients))
    raise ValueError(f"Newton-Schulz coefficients must be a triple (a, b, c), a sequence of "
                     f"triples (one per step) or 'polar_express', got {coefficients!r}")


def default_ns_dtype(device):
    """bfloat16 on CUDA, as the references do: fast, and accurate enough for a direction.
    float32 on a CPU, where bfloat16's speed depends on the chip (faster with avx512_bf16
    or AMX, far slower without) and float32 keeps results independent of it."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def newton_schulz(G, steps=5, eps=1e-7, dtype=None, coefficients=NS_COEFFICIENTS):
    """Approximately orthogonalize G: return ~U V^T where G = U S V^T (Keller Jordan's NS5).

    X is first divided by its Frobenius norm, which bounds the spectral norm by 1; each
    step then applies the odd polynomial p(x) = a x + b x^3 + c x^5 to every singular value
    at once, via X <- a X + (b A + c A A) X with A = X X^T, pushing all of them towards 1.

    coefficients: one triple for every step (default: Keller Jordan's), a sequence of
    triples, one per step, or "polar_express" (POLAR_EXPRESS). Keller Jordan's overshoot on
    purpose, so the output's singular values land roughly in [0.7, 1.2], not at 1 (Muon's
    authors found this does not hurt training). A per-step schedule does better in the
    same 5 steps: on a 256 x 512 matrix of condition number 100, Keller Jordan's leave
    the singular values in [0.68, 1.20], Polar Express's in [0.86, 1.14] (condition 1000:
    [0.11, 1.20] against [0.23, 1.14]; measured in float64, much the same in bfloat16).
    The price: a schedule is fit to singular values in (0, 1] and, to be that steep, it
    explodes just past 1 (five Polar Express steps take 1.02 to 1.14, 1.05 to 1e185).
    Rounding, in bfloat16 above all, can put the largest one slightly above 1, so with a
    schedule X is divided by SCHEDULE_MARGIN = 1.02 times ||X||_F, the safety factor these
    five were computed with (as modded-nanogpt does; the Polar Express code and nanochat
    use 1.01): 4% of headroom, for a little less lift at the bottom (1e-3 ends at 0.85
    instead of 0.86). Keller Jordan's single triple stays bounded past 1 and gets no
    margin, so the default is exactly torch.optim.Muon's.

    Caveat: 5 steps of Keller Jordan's lift a singular value by at most a^5 ~ 490: those
    below ~1.3e-3 * ||G||_F come out below 0.6 (measured), so a very ill-conditioned G is
    only partly orthogonalized. The result does not depend on the scale of G as long as
    ||G||_F > eps; below that the output shrinks with G (as in torch.optim.Muon, whose eps
    this is).

    G: (..., m, n); a leading batch dimension orthogonalizes same-shape matrices in one call.
    dtype: compute dtype; None means default_ns_dtype(G.device). Returns G's dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a (..., m, n) tensor, got shape {tuple(G.shape)}")
    schedule = ns_schedule(coefficients, steps)
    margin = 1.0 if is_triple(coefficients) else SCHEDULE_MARGIN
    X = G.to(dtype or default_ns_dtype(G.device))
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # work on the wide side: A = X X^T is then the smaller Gram matrix
        X = X.mT
    norm = X.norm(dim=(-2, -1), keepdim=True)
    X = X / (norm if margin == 1.0 else norm * margin).clamp_min(eps)
    for a, b, c in schedule:
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


def row_normalize(U):
    """RMNP's direction (Deng et al., arXiv 2603.20527, ICML 2026): every row of U divided by
    its L2 norm. Rows are output units: each neuron's incoming weights move by the same
    amount, each in the direction its own momentum points.

    Why this can stand in for orthogonalization: the polar factor of U is
    (U U^T)^(-1/2) U, and where the rows of U are nearly orthogonal to each other (U U^T
    nearly diagonal, the dominance the authors report in transformers' momenta) that is
    just diag(row norms)^-1 U. It is MuonEq-R's equilibration with no Newton-Schulz after it:
    O(mn), two reductions and a scaling, where Newton-Schulz costs O(mn min(m, n)).
    Never transposed, whatever the shape (the authors found the transposed variant trains
    worse), so its RMS is exactly 1/sqrt(n) and its scale factor its own (RMNP.scale_factor).

    Each row is first divided by its largest |entry|, so that the squares neither underflow
    nor overflow (as in equilibrate): invariant to the scale of U. Zero rows stay zero.
    """
    tiny = torch.finfo(U.dtype).tiny
    X = U / U.abs().amax(dim=-1, keepdim=True).clamp_min(tiny)  # each row's largest entry is +-1
    return X / torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min(tiny)


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


COMPILED = ("newton_schulz", "equilibrate", "normuon_normalize", "racs", "row_normalize", "update_scale")
_eager = {}  # the plain functions, while compiled ones stand in for them


def use_compiled_math(enabled=True, **compile_options):
    """Swap the functions above for torch.compile'd versions (enabled=False swaps them back),
    which every optimizer then looks up by name: mostly a CUDA win (the elementwise work
    around the matmuls, and all of RACS, fused into fewer kernels).

    They are compiled with dynamic shapes, so that one graph serves many matrix shapes.
    Compiled apart still: a batch of one matrix (torch specializes sizes of 1), the tall
    and the wide branch of newton_schulz, and each dtype and option value (coefficients,
    mode, p). In a scaled-down GPT-2 step that is at most 2 graphs per function and in a
    ResNet-18 step (11 matrix shapes) 4, where torch's default, static shapes until a
    recompile, takes up to 4 and 5, and static shapes alone 11: more than torch's
    recompile limit (8), past which a function silently runs eager. The first steps pay
    for compiling. compile_options go to torch.compile (e.g. mode="max-autotune", or
    backend="eager" to check the tracing alone); to change them, swap back first.
    """
    for name in COMPILED:
        if enabled and name not in _eager:
            _eager[name] = globals()[name]
            globals()[name] = torch.compile(_eager[name], **{"dynamic": True, **compile_options})
        elif not enabled and name in _eager:
            globals()[name] = _eager.pop(name)


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
    model.named_parameters() or a prefix of it ("blocks.1" is blocks.1.* but not
    blocks.10.*), into one side. Frozen tensors (requires_grad=False) are routed too, as
    torch.optim keeps every tensor it is given: skipped while they have no gradient, they
    train once unfrozen.

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


def named_tensors(params):
    """(names or None, tensors) from what torch.optim accepts as a group's params: a tensor,
    tensors, or (name, tensor) pairs as model.named_parameters() gives them."""
    items = [params] if torch.is_tensor(params) else list(params)
    if items and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
                     and torch.is_tensor(x[1]) for x in items):
        return [n for n, _ in items], [p for _, p in items]
    if all(torch.is_tensor(x) for x in items):
        return None, items
    kinds = sorted({type(x).__name__ for x in items if not torch.is_tensor(x)})
    raise TypeError(f"expected an nn.Module, a list of param-group dicts, tensors or (name, tensor) "
                    f"pairs, got {', '.join(kinds)}: pass the model itself, e.g. build_optimizer(name, model)")


def split_by_shape(group):
    """A param group that does not say `use_adamw`, split the way param_groups splits a
    model as far as shapes alone can tell: tensors with >= 2 dims under the matrix rule,
    the others under AdamW without weight decay. Names and the group's own options stay."""
    names = group.get("param_names") or [None] * len(group["params"])
    parts = []
    for matrices, extra in ((True, dict(use_adamw=False, name=group.get("name", "matrix"))),
                            (False, dict(use_adamw=True, weight_decay=0.0, name="adamw_no_decay"))):
        chosen = [(n, p) for n, p in zip(names, group["params"]) if (p.ndim >= 2) == matrices]
        if chosen:
            part = dict(group, params=[p for _, p in chosen], **extra)
            if "param_names" in group:
                part["param_names"] = [n for n, _ in chosen]
            parts.append(part)
    return parts


def as_param_groups(params):
    """What a torch user passes, as param groups: an nn.Module (routed by `param_groups`),
    a list of param-group dicts (copied: torch.optim writes its defaults into them), or
    tensors or (name, tensor) pairs (routed by shape alone, with a warning: embeddings and
    the head cannot be told from hidden matrices without the module)."""
    if isinstance(params, nn.Module):
        return param_groups(params)
    params = list(params) if not torch.is_tensor(params) else [params]
    if params and all(isinstance(g, dict) for g in params):
        return [dict(g) for g in params]
    names, tensors = named_tensors(params)
    if not tensors:
        raise TypeError("expected an nn.Module, a list of param-group dicts or tensors, got "
                        "nothing: pass the model itself, e.g. build_optimizer(name, model)")
    warnings.warn("parameters given without their module are routed by shape alone: every "
                  "tensor with >= 2 dims gets the matrix rule, embeddings and the head included. "
                  "Pass the nn.Module (or reg.param_groups(model)) to send those to AdamW.",
                  stacklevel=3)
    return split_by_shape(dict(params=tensors, **({"param_names": names} if names else {})))


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
# 3. The optimizers: one step for the whole family, five directions
# -----------------------------------------------------------------------------

def finite_in(low, high=math.inf, high_open=False):
    """A check that a value is a finite real number in [low, high] (or [low, high))."""
    def ok(x):
        real = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        return real and (low <= x < high if high_open else low <= x <= high)
    return ok, f"a finite number in [{low:g}, {high:g}{')' if high_open else ']'}"


def one_of(*choices):
    return (lambda x: x in choices), " or ".join(map(repr, choices))


def valid_coefficients(c):
    try:
        ns_schedule(c, 1)
    except ValueError:
        return False
    return True


AN_INT_ABOVE_0 = (lambda n: isinstance(n, int) and not isinstance(n, bool) and n >= 1), "an int >= 1"
# What every hyperparameter must be, checked when a param group is added (never inside
# step(), where a NaN lr would silently turn the weights into NaN).
HYPERPARAMETERS = {
    "lr": finite_in(0), "weight_decay": finite_in(0), "eps": finite_in(0),
    "betas": ((lambda b: isinstance(b, (tuple, list)) and len(b) == 2), "a pair (beta1, beta2)"),
    "momentum": finite_in(0, 1, True), "betas[0]": finite_in(0, 1, True),
    "betas[1]": finite_in(0, 1, True), "beta2": finite_in(0, 1, True),
    "scale": one_of("rms", "spectral"), "mode": one_of("R", "C", "RC", None),
    "p": one_of(1, 2, math.inf), "ns_steps": AN_INT_ABOVE_0, "racs_steps": AN_INT_ABOVE_0,
    "ns_coefficients": (valid_coefficients, "a triple (a, b, c), a sequence of triples or 'polar_express'"),
    "cautious_wd": ((lambda x: isinstance(x, bool)), "True or False"),
}


def check_hyperparameters(group, where):
    betas = group.get("betas") if isinstance(group.get("betas"), (tuple, list)) else ()
    values = {**group, **{f"betas[{i}]": b for i, b in enumerate(betas)}}
    for key, (ok, what) in HYPERPARAMETERS.items():
        if key in values and torch.is_tensor(values[key]):  # torch.optim's answer, when not fused
            raise ValueError(f"{key} as a Tensor is not supported: pass a number, e.g. "
                             f"{key}={key}.item() {where}")
        if key in values and not ok(values[key]):
            raise ValueError(f"{key} must be {what}, got {values[key]!r} {where}")


class MatrixOptimizer(torch.optim.Optimizer):
    """The shared skeleton: `step` below is the whole update, and a method supplies only
    its `direction` (and its own options, with their defaults, in `method_defaults`).

    A param group with `use_adamw=True` is stepped with AdamW (betas, eps, the group's lr
    and weight_decay); every other group gets the matrix rule and holds only tensors with
    >= 2 dims. `params`: an nn.Module, param-group dicts, tensors or named tensors
    (`as_param_groups`). lr (1e-3) and weight_decay (0.1, decoupled, times the unscaled lr)
    serve both rules; momentum (0.95) is the EMA coefficient mu; nesterov (True) uses the
    look-ahead; scale "rms" gives updates of RMS ~0.2 (AdamW's lr carries over), "spectral"
    Keller Jordan's sqrt(max(1, m/n)) (use lr ~0.02); cautious_wd (False) decays only where
    decay and step agree (`decay_and_step`); betas (0.9, 0.95) and eps (1e-8) are the AdamW
    part's. State is float32 at least (`stat_dtype`), also after load_state_dict. Every
    matrix rule is invariant to the scale of the gradients, down to Newton-Schulz's floor
    (||U||_F > 1e-7).

    torch.optim's conventions hold: state_dict, hooks, closures, schedulers. A scheduler
    that cycles momentum (OneCycleLR, CyclicLR with cycle_momentum=True) writes betas[0] of
    every group, torch's rule for an optimizer with betas; a matrix group it manages (one
    with max_momentum) then takes its momentum from there, so the whole optimizer cycles."""

    method_defaults = {}  # the method's own options and their defaults
    exact_rms = False     # rescale to RMS exactly 0.2: for directions whose RMS varies

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 scale="rms", cautious_wd=False, betas=(0.9, 0.95), eps=1e-8, **options):
        unknown = set(options) - set(self.method_defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected option(s) {sorted(unknown)}; "
                            f"its own options are {sorted(self.method_defaults) or 'none'}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        scale=scale, cautious_wd=cautious_wd, betas=betas, eps=eps,
                        use_adamw=False, **{**self.method_defaults, **options},
                        fused=True)  # tells load_state_dict to keep AdamW's step on the device
        super().__init__(as_param_groups(params), defaults)
        if not any(p.ndim >= 2 for g in self.param_groups if not g["use_adamw"] for p in g["params"]):
            warnings.warn(f"{type(self).__name__} received no hidden matrices: every parameter "
                          f"gets AdamW. Routing:\n{describe_groups(self.param_groups)}\n"
                          "(param_groups takes the last nn.Linear as the head: pass head=None "
                          "or matrix_names=[...] to put weights under the matrix rule)", stacklevel=2)

    def add_param_group(self, param_group):
        """torch.optim's, with three differences. A group that does not say `use_adamw` is
        split by shape (split_by_shape), so a layer added while fine-tuning joins as torch
        users write it: opt.add_param_group({"params": block.parameters()}); a new head or
        embedding says use_adamw=True. A group gets names (named parameters, or placeholders)
        exactly when the others have them, so named and unnamed groups mix. And the group is
        checked *before* anything is added: a rejected group leaves the optimizer as it was."""
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError(f"a param group must be a dict with 'params', got {type(param_group).__name__}")
        names, params = named_tensors(param_group["params"])
        group = dict(param_group, params=params, **({"param_names": names} if names else {}))
        groups = [group] if "use_adamw" in group else split_by_shape(group)
        taken = {p for g in self.param_groups for p in g["params"]}
        for k, g in enumerate(groups):
            where = f"(param group {len(self.param_groups) + k})"
            check_hyperparameters({**self.defaults, **g}, where)
            if any(p in taken for p in g["params"]):
                raise ValueError(f"a parameter is already in another param group {where}")
            for p in [] if g["use_adamw"] else g["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} is in a matrix group {where}: the "
                        "matrix rule needs >= 2 dims. Leave use_adamw out (tensors are then routed "
                        "by shape), build the groups with reg.param_groups(model), or mark the "
                        "group use_adamw=True.")
        named = not self.param_groups or "param_names" in self.param_groups[0]
        for g in groups:
            if named and "param_names" not in g:
                g["param_names"] = [f"param_groups[{len(self.param_groups)}][{i}]" for i in range(len(g["params"]))]
            if not named:
                g.pop("param_names", None)
            super().add_param_group(g)

    def load_state_dict(self, state_dict):
        """torch.optim's, but the state comes back as it was saved, float32 at least: torch
        casts every state tensor to its parameter's dtype, which would round a bfloat16
        weight's momentum to bfloat16 (and break the next step)."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for index, p in zip(saved_group["params"], group["params"]):
                for key, value in saved.get(index, {}).items():
                    if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                        self.state[p][key] = value.to(device=p.device, dtype=stat_dtype(p))

    def __setstate__(self, state):
        """Groups saved before an option existed get its default (torch.optim's habit)."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def direction(self, U, states, group):
        """The one line that differs. U: (k, m, n), the look-ahead momenta of k same-shape
        matrices; states: their k per-parameter state dicts (for methods with state).
        Returns D, (k, m, n)."""
        raise NotImplementedError

    def scale_factor(self, D, scale):
        """What D is multiplied by before lr: see update_scale."""
        return update_scale(D, scale, self.exact_rms)

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
            if "max_momentum" in group:  # a momentum-cycling scheduler writes betas[0]
                group["momentum"] = group["betas"][0]
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
                D = D * self.scale_factor(D, group["scale"])
                for p, d in zip(batch, D):                                # W*(1-lr*wd) - lr*D
                    decay_and_step(p, d.view_as(p), lr, wd, group["cautious_wd"])
        return loss

    def adamw_step(self, group, params):
        """AdamW (Loshchilov & Hutter) for the parameters that are not hidden matrices: torch's
        own fused kernel, so this part is exactly what the "adamw" baseline does to them.
        A low-precision or non-contiguous parameter is stepped through a contiguous float32
        copy (state in float32, decay and step rounded once): the fused kernel wants one
        dtype throughout, and on a CPU it updates a strided tensor wrongly, writing into the
        memory between its elements (torch 2.13, also torch.optim.AdamW(fused=True))."""
        for p in params:
            state = self.state[p]
            if "step" not in state:  # the layout torch.optim.AdamW(fused=True) keeps
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros(p.shape, dtype=stat_dtype(p), device=p.device)
                state["exp_avg_sq"] = torch.zeros(p.shape, dtype=stat_dtype(p), device=p.device)
        states = [self.state[p] for p in params]
        work = [p if p.dtype == stat_dtype(p) and p.is_contiguous()
                else p.detach().to(stat_dtype(p), memory_format=torch.contiguous_format, copy=True)
                for p in params]
        beta1, beta2 = group["betas"]
        adamw_update(
            work, [p.grad.to(w.dtype).contiguous() for p, w in zip(params, work)],
            [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states], fused=True, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
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


def decay_and_step(p, D, lr, weight_decay, cautious=False):
    """W <- W*(1 - lr*wd) - lr*D, in D's dtype (float32 at least) and rounded to W's once:
    in bfloat16 the decay alone would round away (W*(1 - 1e-4) == W).

    Cautious weight decay (cautious=True, from modded-nanogpt's and nanochat's optimizers)
    decays only the coordinates where D and W share a sign, those the step itself is
    shrinking: W <- W - lr*wd*W*[D*W >= 0] - lr*D. Elsewhere the step pushes a weight away
    from zero and decay would partly undo it; there it is left out."""
    W = p if p.dtype == D.dtype else p.to(D.dtype)  # a float32 copy of a low-precision weight
    if cautious:
        W.sub_(W * (D * W >= 0), alpha=lr * weight_decay)
    else:
        W.mul_(1 - lr * weight_decay)
    W.add_(D, alpha=-lr)
    if W is not p:
        p.copy_(W)


class Muon(MatrixOptimizer):
    """Muon: the look-ahead momentum, orthogonalized by Newton-Schulz (Keller Jordan, 2024).
    With scale="spectral" this is torch.optim.Muon(adjust_lr_fn="original"), with scale="rms"
    torch.optim.Muon(adjust_lr_fn="match_rms_adamw"), plus an AdamW part for `use_adamw`
    groups. Options: ns_steps (5), ns_dtype (None: bfloat16 on CUDA, float32 elsewhere),
    ns_coefficients (Keller Jordan's triple; or "polar_express", see newton_schulz)."""

    method_defaults = dict(ns_steps=5, ns_dtype=None, ns_coefficients=NS_COEFFICIENTS)

    def direction(self, U, states, group):
        return newton_schulz(U, steps=group["ns_steps"], dtype=group["ns_dtype"],
                             coefficients=group["ns_coefficients"])


class MuonEq(Muon):
    """MuonEq: equilibrate rows ("R"), columns ("C") or both ("RC"), then Muon
    (arXiv 2603.28254). Balancing happens *before* orthogonalization; no extra state.
    Options: Muon's, and mode ("R", the paper's default for hidden weights)."""

    method_defaults = dict(Muon.method_defaults, mode="R")

    def direction(self, U, states, group):
        return newton_schulz(equilibrate(U, group["mode"]) if group["mode"] else U, steps=group["ns_steps"],
                             dtype=group["ns_dtype"], coefficients=group["ns_coefficients"])


class NorMuon(Muon):
    """NorMuon: Muon, then each row divided by its running RMS (arXiv 2510.05491).
    Balancing happens *after* orthogonalization; extra state: one number per row.
    The update is rescaled to RMS exactly 0.2 (scale="rms"), as in the paper; with
    scale="spectral" to the Frobenius norm of a semi-orthogonal matrix, then Keller
    Jordan's factor (the official code restores the norm NS5 gave, which is close to it).
    Options: Muon's, beta2 (0.95), and mode (None; "R", "C" or "RC" equilibrates first,
    as MuonEq does).

    Stacked, this is nanochat's Muon step: build_optimizer("normuon", model, mode="R",
    ns_coefficients="polar_express", cautious_wd=True) is MuonEq-R, then Polar Express,
    then NorMuon's row normalization, then cautious weight decay. Where nanochat (2026)
    differs: its second moment is kept per row for a tall matrix but per column for a
    wide one; it snaps the orthogonalized matrix's norm to a semi-orthogonal one's and
    restores that norm after normalizing, then scales by Keller Jordan's sqrt(max(1, m/n))
    rather than to RMS 0.2, and multiplies the decay by that factor too; it divides by
    1.01 ||X||_F before Polar Express (we: 1.02) and guards its row norms with an absolute
    1e-6 (we: a relative guard, see equilibrate)."""

    method_defaults = dict(Muon.method_defaults, beta2=0.95, mode=None)
    exact_rms = True

    def direction(self, U, states, group):
        X = equilibrate(U, group["mode"]) if group["mode"] else U
        O = newton_schulz(X, steps=group["ns_steps"], dtype=group["ns_dtype"], coefficients=group["ns_coefficients"])
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


class RMNP(MatrixOptimizer):
    """RMNP: every row of the look-ahead momentum divided by its L2 norm, in place of the
    orthogonalization (Deng et al., arXiv 2603.20527, ICML 2026; see row_normalize).
    Balancing happens *instead of* orthogonalization, as in REG: no matmul, and the only
    state is the momentum buffer. The authors report final losses at or below Muon's in
    GPT-2 (small to XL) and LLaMA (60M to 1B) pre-training, often behind early and catching
    up late, with a preconditioning step 13-44x faster than Newton-Schulz; they expect it
    may not suit fine-tuning, untested. Their code keeps a sum-form momentum, 1/(1-mu)
    times our EMA one: the row normalization removes that factor, so the directions are
    the same. No options of its own."""

    def direction(self, U, states, group):
        return row_normalize(U)

    def scale_factor(self, D, scale):
        """Unit rows make D's RMS exactly 1/sqrt(n), so no measuring: "rms" is 0.2*sqrt(n),
        an update of RMS exactly 0.2 (less where a row is zero), "spectral" their
        sqrt(max(1, m/n))."""
        m, n = D.shape[-2:]
        if scale not in ("rms", "spectral"):
            raise ValueError(f"scale must be 'rms' or 'spectral', got {scale!r}")
        return 0.2 * math.sqrt(n) if scale == "rms" else math.sqrt(max(1.0, m / n))


OPTIMIZERS = {
    "adamw": None,  # torch.optim.AdamW, the baseline (see build_optimizer)
    "muon": (Muon, {}),
    "muoneq-r": (MuonEq, {"mode": "R"}),
    "muoneq-c": (MuonEq, {"mode": "C"}),
    "muoneq-rc": (MuonEq, {"mode": "RC"}),
    "normuon": (NorMuon, {}),
    "reg": (REG, {}),
    "rmnp": (RMNP, {}),
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
    for key in ("momentum", "nesterov", "scale", "cautious_wd"):
        if key in kw:
            raise ValueError(f"{key!r} is not an AdamW option (it belongs to the matrix rules)")
    check_hyperparameters(dict(kw, lr=lr, weight_decay=weight_decay), "(adamw)")
    with warnings.catch_warnings():  # shape routing is right for AdamW: nothing to warn
        warnings.simplefilter("ignore")
        groups = as_param_groups(params)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **{"betas": (0.9, 0.95), **kw})


# -----------------------------------------------------------------------------
# 4. Looking inside: what an optimizer would do to one weight now
# -----------------------------------------------------------------------------

def inspect_matrix(opt, p):
    """matrix_stats of weight p's momentum and of the direction optimizer `opt` (of this file,
    or torch.optim.AdamW) would step it along now, computed on copies: looking never changes
    the run. What train_gpt.py --track logs during training."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    state, (m, n) = opt.state.get(p, {}), matrix_shape(p)
    if isinstance(opt, MatrixOptimizer) and "momentum_buffer" in state:
        momentum = state["momentum_buffer"].reshape(m, n).float()
        copies = [{k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}]
        update = opt.direction(momentum[None].clone(), copies, group)[0]
    elif "exp_avg" in state:  # AdamW: the bias-corrected m / (sqrt(v) + eps)
        (beta1, beta2), step = group["betas"], float(state["step"])
        momentum = state["exp_avg"].reshape(m, n).float()
        v_hat = state["exp_avg_sq"].reshape(m, n).float() / (1 - beta2 ** step)
        update = momentum / (1 - beta1 ** step) / (v_hat.sqrt() + group["eps"])
    else:
        return None
    return dict(momentum=matrix_stats(momentum), update=matrix_stats(update))
