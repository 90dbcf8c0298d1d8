#!/usr/bin/env python3
"""Golden cases for the CCP loss of one layer, from PyTorch float64 autograd.

The loss is written the way the original CCPL code writes it (NeighborSample + PatchNCELoss of
JarrentWu1031/CCPL, net.py: gather centre and neighbour rows, subtract, normalise, bmm, the
positive concatenated with the diagonal-masked negatives, cross-entropy), with the three fixes
of the contract (docs/ccpl-loss.md, "Where ccpl departs from the original code"):

- the finite derivative of the normalisation at an exactly-zero row (the original's
  `x.pow(2).sum().pow(0.5)` gives NaN there);
- the centre count clamped to the interior (the original indexes its direction table with
  the unclamped `num_s`);
- tau a real parameter.

It is an independent check of the spec's formula: unless `--no-check`, every case is compared,
before it is written, with a NumPy implementation of the spec's closed forms (steps 3-8,
forward and backward) and with central finite differences of the float64 loss.

Each case is one safetensors file (NCHW):

    feat_q       F32 [B,C,H,W]  features of the generated image
    feat_k       F32 [B,C,H,W]  features of the content image
    centers      I64 [N]        flat interior indices h*W+w, in sampling order
    tau          F64 [1]
    loss         F64 [1]
    grad_feat_q  F64 [B,C,H,W]  d loss / d feat_q (feat_k detached, as the original)
    grad_feat_k  F64 [B,C,H,W]  d loss / d feat_k as if feat_k were not detached

The features are stored as float32; everything is computed in float64 from those float32
values, as the Rust reference does.

Usage:
    make_goldens.py OUT_DIR [--seed S] [--case B,C,H,W,NUM_S,TAU[,FLAT] ...] [--random K]
                    [--max-elements M] [--no-check]

Without --case and --random it writes the default set (the one committed under tests/golden).
FLAT is none, q, k or qk: exactly flat regions that make some difference rows exactly zero.
"""

import argparse
import json
import math
import pathlib
import sys

import numpy as np
import torch
from safetensors.torch import save_file

# The one PyTorch port of the original CCPL, shared with the Python tests and the baselines.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "bench"))
from original import NORM_EPS, layer_loss, layer_loss_at, neighbor_ids, original_normalize  # noqa: E402

FLAT_KINDS = ("none", "q", "k", "qk")

# Limits of the checks, from measurement (committed set and `--random 40 --seed 7`): the NumPy
# loss agrees to 4e-16 and the gradients to 4e-15, except up to 1e-11 where rows are zero on
# both sides over a dense patch of centres: a position's gradient there sums `+-g/eps` terms
# (spec step 5) that cancel to ~1e-8 of their size, so their float64 rounding shows. Finite
# differences agree to 4e-9 of the gradient's norm.
CHECK_LIMITS = {"spec_loss": 1e-12, "spec_grad_q": 1e-9, "spec_grad_k": 1e-9, "fd_grad_q": 1e-6, "fd_grad_k": 1e-6}

# C = 1 is left out: a row is a scalar, its normalised value sign(d) n/(n+eps), so the gradient
# is eps/(n+eps)^2 g, an O(eps) difference of O(1) terms that float64 gets only to ~1e-9.
#
# The default set: small enough to commit (each file well under 100 KB), odd sizes, the three
# temperatures, N from 1 to the whole interior (and a request above it, clamped), zero rows.
DEFAULT_CASES = [
    # B, C, H, W, num_s, tau, flat
    (1, 2, 3, 3, 8, 0.07, "none"),  # the smallest map: one centre (8 requested, clamped)
    (2, 5, 7, 9, 35, 0.07, "none"),  # N = the whole interior, 5x7
    (3, 4, 6, 5, 7, 0.01, "none"),  # a low temperature: large logits
    (2, 8, 9, 11, 13, 0.3, "q"),  # zero rows in feat_q
    (1, 16, 5, 13, 20, 0.07, "k"),  # zero rows in feat_k
    (2, 3, 10, 7, 1000, 0.07, "qk"),  # zero rows on both sides; 1000 requested, 40 taken
]


# ----------------------------------------------------------------------------------------------
# The loss, written like the original (with the spec's fixes): tools/bench/original.py
# ----------------------------------------------------------------------------------------------


def torch_loss_and_grads(feat_q32, feat_k32, centers, tau):
    """Loss, `grad_feat_q` (feat_k detached, as the original) and `grad_feat_k` (not detached).

    Two passes: the original's detached pass gives the loss and `grad_feat_q`; a second pass
    without the detach gives `grad_feat_k`, and must agree with the first on the rest.
    """
    feat_q = feat_q32.double().requires_grad_(True)
    feat_k = feat_k32.double().requires_grad_(True)
    loss = layer_loss(feat_q, feat_k, centers, tau, detach_k=True)
    loss.backward()
    if feat_k.grad is not None:
        raise AssertionError("the detached pass gave feat_k a gradient")
    grad_q = feat_q.grad.clone()

    feat_q.grad = None
    loss_both = layer_loss(feat_q, feat_k, centers, tau, detach_k=False)
    loss_both.backward()
    if loss_both.item() != loss.item() or not torch.equal(feat_q.grad, grad_q):
        raise AssertionError("detaching feat_k changed the loss or grad_feat_q")
    return loss.detach(), grad_q, feat_k.grad.clone()


def original_normalize_gives_nan(feat_q32, feat_k32, centers, tau):
    """Whether the original's normalisation (`pow(0.5)` of the squared norm) gives a NaN
    gradient here: it must exactly when the case has zero rows, or the case tests nothing."""
    feat_q = feat_q32.double().requires_grad_(True)
    feat_k = feat_k32.double().requires_grad_(True)
    ids = neighbor_ids(centers, feat_q.shape[3])
    layer_loss_at(feat_q, feat_k, ids, tau, detach_k=False, norm=original_normalize).backward()
    return bool(torch.isnan(feat_q.grad).any() or torch.isnan(feat_k.grad).any())


# ----------------------------------------------------------------------------------------------
# The spec's closed forms in NumPy: the independent check
# ----------------------------------------------------------------------------------------------


def spec_offsets(width):
    """Spec step 2: flat offsets of the 8 neighbours, raster order."""
    return [-(width + 1), -width, -(width - 1), -1, 1, width - 1, width, width + 1]


def spec_rows(feat, centers):
    """Spec step 3: `d[b, k*N + x, :] = f[b, :, p_x] - f[b, :, p_x + off_k]`, `(B, S, C)`."""
    batch, channels, height, width = feat.shape
    flat = feat.reshape(batch, channels, height * width)
    rows = [flat[:, :, p] - flat[:, :, p + off] for off in spec_offsets(width) for p in centers]
    return np.stack(rows, axis=1)


def spec_normalize(d):
    """Spec step 5 forward: `v = d / (||d|| + eps)` and the norms."""
    n = np.sqrt((d * d).sum(axis=2, keepdims=True))
    return d / (n + NORM_EPS), n


def spec_normalize_backward(d, n, g_v):
    """Spec step 5 backward: `g_v/(n+eps) - d (d.g_v) / (n (n+eps)^2)`, second term 0 at n == 0."""
    dot = (d * g_v).sum(axis=2, keepdims=True)
    safe = np.where(n > 0, n, 1.0)
    second = np.where(n > 0, d * dot / (safe * (n + NORM_EPS) ** 2), 0.0)
    return g_v / (n + NORM_EPS) - second


def spec_rows_backward(g_d, shape, centers):
    """Spec step 8, last part: a centre gets `+g`, its neighbour `-g`, overlaps add up."""
    batch, channels, height, width = shape
    grad = np.zeros((batch, channels, height * width))
    n = len(centers)
    for k, off in enumerate(spec_offsets(width)):
        for x, p in enumerate(centers):
            grad[:, :, p] += g_d[:, k * n + x, :]
            grad[:, :, p + off] -= g_d[:, k * n + x, :]
    return grad.reshape(shape)


def spec_loss_and_grads(feat_q, feat_k, centers, tau):
    """Spec steps 3-8 in float64: loss, grad wrt feat_q, grad wrt feat_k (not detached)."""
    d_q, d_k = spec_rows(feat_q, centers), spec_rows(feat_k, centers)
    v_q, n_q = spec_normalize(d_q)
    v_k, n_k = spec_normalize(d_k)
    batch, rows, _ = v_q.shape
    logits = np.einsum("bic,bjc->bij", v_q, v_k) / tau
    top = logits.max(axis=2, keepdims=True)
    lse = top + np.log(np.exp(logits - top).sum(axis=2, keepdims=True))
    diagonal = np.einsum("bii->bi", logits)
    loss = (lse[:, :, 0] - diagonal).mean()
    g = (np.exp(logits - lse) - np.eye(rows)[None]) / (batch * rows)
    g_vq = np.einsum("bij,bjc->bic", g, v_k) / tau
    g_vk = np.einsum("bij,bic->bjc", g, v_q) / tau
    grad_q = spec_rows_backward(spec_normalize_backward(d_q, n_q, g_vq), feat_q.shape, centers)
    grad_k = spec_rows_backward(spec_normalize_backward(d_k, n_k, g_vk), feat_k.shape, centers)
    return loss, grad_q, grad_k


def zero_rows(feat, centers):
    """Number of exactly-zero difference rows, and the positions they involve (a mask)."""
    d = spec_rows(feat, centers)
    zero = ~(d != 0).any(axis=2)  # (B, S)
    batch, _, height, width = feat.shape
    involved = np.zeros((batch, height * width), dtype=bool)
    n = len(centers)
    for b, r in zip(*np.nonzero(zero)):
        k, x = divmod(int(r), n)
        involved[b, centers[x]] = True
        involved[b, centers[x] + spec_offsets(width)[k]] = True
    return int(zero.sum()), involved.reshape(batch, 1, height, width)


def relative_error(a, b):
    """`||a - b|| / ||b||` (`||a||` when `b == 0`)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom > 0 else float(np.linalg.norm(a))


def finite_difference_errors(feat_q32, feat_k32, centers, tau, grad_q, grad_k, rng, directions=6):
    """Fourth-order central differences of the float64 loss along random unit directions `u`,
    against `grad . u`; returns the worst error for feat_q and for feat_k, relative to the
    norm of the gradient on the positions the directions cover.

    The step is a small fraction of the smallest non-zero row norm, the scale on which the
    normalisation bends. Directions avoid the positions of exactly-zero rows: the loss has a
    kink there (the spec picks one finite derivative), and elsewhere moving along `u` keeps
    those rows zero.
    """
    base_q, base_k = feat_q32.double().numpy(), feat_k32.double().numpy()
    centers_t = torch.from_numpy(np.asarray(centers, dtype=np.int64))

    def loss_at(fq, fk):
        with torch.no_grad():
            return layer_loss(torch.from_numpy(fq), torch.from_numpy(fk), centers_t, tau, detach_k=True).item()

    worst = []
    for base, grad, which in ((base_q, grad_q, "q"), (base_k, grad_k, "k")):
        _, avoid = zero_rows(base, centers)
        norms = np.linalg.norm(spec_rows(base, centers), axis=2)
        h = 1e-2 * norms[norms > 0].min()
        scale = np.linalg.norm(grad * ~avoid)  # the most |grad . u| can be
        errors = []
        for _ in range(directions):
            u = rng.standard_normal(base.shape) * ~avoid
            u /= np.linalg.norm(u)

            def at(t):
                moved = base + t * u
                return loss_at(moved, base_k) if which == "q" else loss_at(base_q, moved)

            fd = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
            exact = float((grad * u).sum())
            errors.append(abs(fd - exact) / scale)
        worst.append(max(errors))
    return worst


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def sample_centers(height, width, num_s, gen):
    """Spec step 1, the original's way: a random permutation of the interior, first N."""
    interior = (height - 2) * (width - 2)
    s_ids = torch.randperm(interior, generator=gen)[: min(num_s, interior)]
    return (s_ids // (width - 2) + 1) * width + (s_ids % (width - 2) + 1)


def vgg_like(batch, channels, height, width, gen):
    """Non-negative, spatially smooth-ish features with exact zeros and some dead channels,
    like ReLU outputs of VGG; feat_q is a perturbation of feat_k (a stylised content image)."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    pre = torch.nn.functional.avg_pool2d(randn(batch, channels, height, width), 3, 1, 1, count_include_pad=False)
    scale = torch.exp(0.5 * randn(1, channels, 1, 1))
    bias = 0.3 + 0.3 * randn(1, channels, 1, 1)
    dead = torch.rand(1, channels, 1, 1, generator=gen) < 0.1
    bias = torch.where(dead, torch.full_like(bias, -1e3), bias)
    content = pre * scale + bias
    styled = content + 0.3 * scale * randn(batch, channels, height, width)
    return torch.relu(styled).float(), torch.relu(content).float()


def make_flat(feat_q, feat_k, centers, flat):
    """Exactly flat regions: `q` zeroes the 3x3 window of centre 0 in image 0 of feat_q (dead
    ReLUs: all 8 rows of that centre are zero); `k` copies the centre vector of the last
    centre over its 2x2 block (right, below, below-right) in the last image of feat_k
    (saturation: 3 of its rows are zero); `qk` does both and also zeroes the 3x3 window of
    centre 0 in image 0 of feat_k, so some rows are zero on both sides."""
    width = feat_q.shape[3]

    def hw(p):
        return int(p) // width, int(p) % width

    if flat in ("q", "qk"):
        h, w = hw(centers[0])
        feat_q[0, :, h - 1 : h + 2, w - 1 : w + 2] = 0.0
    if flat in ("k", "qk"):
        h, w = hw(centers[-1])
        feat_k[-1, :, h : h + 2, w : w + 2] = feat_k[-1, :, h, w][:, None, None].clone()
    if flat == "qk":
        h, w = hw(centers[0])
        feat_k[0, :, h - 1 : h + 2, w - 1 : w + 2] = 0.0


def make_case(spec, gen):
    """Draws one case's inputs; a case without flat regions is redrawn until no row is zero
    (exact zeros of the ReLU can make one by chance)."""
    batch, channels, height, width, num_s, tau, flat = spec
    for _ in range(1000):
        centers = sample_centers(height, width, num_s, gen)
        feat_q, feat_k = vgg_like(batch, channels, height, width, gen)
        make_flat(feat_q, feat_k, centers, flat)
        zq, _ = zero_rows(feat_q.double().numpy(), centers.numpy())
        zk, _ = zero_rows(feat_k.double().numpy(), centers.numpy())
        if (flat == "none") == (zq + zk == 0):
            return feat_q, feat_k, centers, zq, zk
    raise RuntimeError(f"could not draw case {spec} with the wanted zero rows")


def case_name(spec, n):
    batch, channels, height, width, num_s, tau, flat = spec
    name = f"b{batch}_c{channels}_h{height}_w{width}_n{n}_tau{tau:g}"
    return name + ("" if flat == "none" else f"_flat{flat}")


def parse_case(text):
    parts = text.split(",")
    if len(parts) not in (6, 7):
        raise argparse.ArgumentTypeError("expected B,C,H,W,NUM_S,TAU[,FLAT]")
    batch, channels, height, width, num_s = (int(p) for p in parts[:5])
    tau = float(parts[5])
    flat = parts[6] if len(parts) == 7 else "none"
    if min(batch, channels, num_s) < 1 or min(height, width) < 3:
        raise argparse.ArgumentTypeError("need B, C, NUM_S >= 1 and H, W >= 3")
    if not (math.isfinite(tau) and tau > 0):
        raise argparse.ArgumentTypeError("TAU must be finite and > 0")
    if flat not in FLAT_KINDS:
        raise argparse.ArgumentTypeError(f"FLAT must be one of {FLAT_KINDS}")
    return (batch, channels, height, width, num_s, tau, flat)


def random_specs(count, rng, max_elements):
    """Random cases with odd sizes, for larger local runs (CCPL_GOLDEN_DIR)."""
    specs = []
    while len(specs) < count:
        batch = int(rng.integers(1, 5))
        channels = int(rng.choice([2, 3, 7, 16, 31, 64, 65, 128]))  # not 1: see DEFAULT_CASES
        height, width = (int(v) for v in rng.integers(3, 41, size=2))
        if batch * channels * height * width > max_elements:
            continue
        interior = (height - 2) * (width - 2)
        num_s = int(rng.integers(1, int(interior * 1.2) + 2))
        tau = float(rng.choice([0.01, 0.07, 0.3]))
        flat = str(rng.choice(FLAT_KINDS))
        specs.append((batch, channels, height, width, num_s, tau, flat))
    return specs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=20220710)
    parser.add_argument("--case", type=parse_case, action="append", default=[], metavar="B,C,H,W,NUM_S,TAU[,FLAT]")
    parser.add_argument("--random", type=int, default=0, metavar="K", help="add K random cases")
    parser.add_argument("--max-elements", type=int, default=200_000, help="cap on B*C*H*W of random cases")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the NumPy and finite-difference checks")
    args = parser.parse_args()

    torch.set_default_dtype(torch.float64)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    specs = list(args.case) + random_specs(args.random, rng, args.max_elements)
    if not specs:
        specs = DEFAULT_CASES
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(["tools/make_goldens.py"] + sys.argv[1:])

    worst = {}
    for spec in specs:
        feat_q, feat_k, centers, zq, zk = make_case(spec, gen)
        tau = spec[5]
        loss, grad_q, grad_k = torch_loss_and_grads(feat_q, feat_k, centers, tau)
        if not (torch.isfinite(loss) and torch.isfinite(grad_q).all() and torch.isfinite(grad_k).all()):
            raise AssertionError(f"non-finite golden in {spec}")
        name = case_name(spec, centers.shape[0])

        report = {"zero_rows_q": zq, "zero_rows_k": zk}
        if args.check:
            fq, fk, c = feat_q.double().numpy(), feat_k.double().numpy(), centers.numpy()
            spec_loss, spec_gq, spec_gk = spec_loss_and_grads(fq, fk, c, tau)
            report["spec_loss"] = abs(spec_loss - loss.item()) / abs(loss.item())
            report["spec_grad_q"] = relative_error(grad_q.numpy(), spec_gq)
            report["spec_grad_k"] = relative_error(grad_k.numpy(), spec_gk)
            fd_q, fd_k = finite_difference_errors(feat_q, feat_k, c, tau, grad_q.numpy(), grad_k.numpy(), rng)
            report["fd_grad_q"], report["fd_grad_k"] = fd_q, fd_k
            if original_normalize_gives_nan(feat_q, feat_k, centers, tau) != (zq + zk > 0):
                raise AssertionError(f"{name}: the original's NaN should appear exactly with zero rows")
            for key in CHECK_LIMITS:
                worst[key] = max(worst.get(key, 0.0), report[key])
            failed = [k for k, limit in CHECK_LIMITS.items() if not report[k] <= limit]
            if failed:
                raise AssertionError(f"{name}: {failed} over their limits: {report}")

        metadata = {
            "case": name,
            "shape_bchw": json.dumps(list(feat_q.shape)),
            "num_s_requested": str(spec[4]),
            "flat": spec[6],
            "zero_rows_q": str(zq),
            "zero_rows_k": str(zk),
            "seed": str(args.seed),
            "command": command,
            "torch": torch.__version__,
        }
        tensors = {
            "feat_q": feat_q.contiguous(),
            "feat_k": feat_k.contiguous(),
            "centers": centers.to(torch.int64).contiguous(),
            "tau": torch.tensor([tau], dtype=torch.float64),
            "loss": loss.reshape(1),
            "grad_feat_q": grad_q.contiguous(),
            "grad_feat_k": grad_k.contiguous(),
        }
        path = args.out_dir / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        detail = " ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items())
        print(f"{path.name}: loss={loss.item():.6f} {detail}")

    if args.check:
        print("worst: " + " ".join(f"{k}={v:.2e}" for k, v in worst.items()))
    print(f"wrote {len(specs)} cases to {args.out_dir} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
