"""What every op shares: the checks of its arguments, and how a tensor reaches the Rust side.

Every check reads metadata only (type, dtype, device, shape, strides), so the ops' fake
implementations run the same checks under ``torch.compile``. Values (the centres) are checked
in Rust before anything runs.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _ccpl

DEFAULT_TAU: float = _ccpl.DEFAULT_TAU
"""The paper's temperature, 0.07."""

NEIGHBORS = 8
"""Difference rows per centre: the 8 neighbours of the 3x3 window."""

KERNEL_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
"""Storage types of the CUDA kernels (they accumulate in float32)."""

HOST_DTYPES = {**KERNEL_DTYPES, torch.float64: "f64"}
"""Storage types of the CPU path (the float64 reference reads any of them; float64 is what
``torch.autograd.gradcheck`` needs)."""


def check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(name: str, t: object) -> Tensor:
    """A floating-point tensor of a dtype the device's path supports."""
    t = check_tensor(name, t)
    check_dtype(name, t.dtype, t.device)
    return t


def check_dtype(name: str, dtype: object, device: torch.device) -> torch.dtype:
    """A dtype the path of `device` supports."""
    kind = device.type
    if kind == "cuda":
        supported = KERNEL_DTYPES
    elif kind in ("cpu", "meta"):
        supported = HOST_DTYPES
    else:
        raise TypeError(f"{name} is on {device}: ccpl runs on CPU and CUDA tensors")
    if dtype not in supported:
        names = ", ".join(str(d).removeprefix("torch.") for d in supported)
        raise TypeError(f"{name} has dtype {dtype}; on {kind} ccpl takes {names}")
    return dtype


def check_pair(names: tuple[str, str], a: Tensor, b: Tensor) -> None:
    """Two tensors of one op: the same device, dtype and shape."""
    if a.device != b.device:
        raise ValueError(f"{names[0]} is on {a.device} but {names[1]} is on {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{names[0]} has dtype {a.dtype} but {names[1]} has {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} has shape {tuple(a.shape)} but {names[1]} has {tuple(b.shape)}"
        )


def check_like_first(names: tuple[str, str], t: Tensor, first: Tensor) -> None:
    """A layer's tensor `names[0]` of a multi-layer op against the first layer's, `names[1]`:
    every layer of one dtype and device."""
    if t.device != first.device or t.dtype != first.dtype:
        raise ValueError(
            f"{names[0]} is {t.dtype} on {t.device} but {names[1]} is {first.dtype} on "
            f"{first.device}: every layer must have one dtype and device"
        )


def channels_last(name: str, feat: Tensor) -> bool:
    """Whether a `(B, C, H, W)` feature map is stored channels last (NHWC) rather than
    contiguous (NCHW); anything else is refused, never copied behind the caller's back."""
    if feat.dim() != 4:
        raise ValueError(
            f"{name} must be a (B, C, H, W) feature map, got shape {tuple(feat.shape)}"
        )
    if feat.is_contiguous():
        return False
    if feat.is_contiguous(memory_format=torch.channels_last):
        return True
    raise ValueError(
        f"{name} is neither contiguous (NCHW) nor channels_last (NHWC), its strides are "
        f"{feat.stride()}: call .contiguous() or .contiguous(memory_format=torch.channels_last)"
    )


def check_rows(name: str, rows: Tensor) -> None:
    """Rows `(B, S, C)`, contiguous."""
    if rows.dim() != 3:
        raise ValueError(f"{name} must be rows (B, S, C), got shape {tuple(rows.shape)}")
    if not rows.is_contiguous():
        raise ValueError(
            f"{name} is not contiguous (strides {rows.stride()}): call .contiguous()"
        )


def check_centers(centers: object) -> Tensor:
    """Centres as the ops take them: a 1-D int64 CPU tensor of flat indices `h*W + w`. Their
    values (inside the interior, none repeated) are checked in Rust before any work."""
    centers = check_tensor("centers", centers)
    if centers.dtype != torch.int64:
        raise TypeError(f"centers must be int64 (a LongTensor), got {centers.dtype}")
    if centers.dim() != 1:
        raise ValueError(f"centers must be 1-D, got shape {tuple(centers.shape)}")
    if centers.device.type not in ("cpu", "meta"):
        raise ValueError(
            f"centers are on {centers.device}: they must be a CPU tensor (they are checked on "
            "the host and copied to the GPU without a wait; move them with .cpu())"
        )
    if centers.shape[0] == 0:
        raise ValueError("centers is empty: at least one centre is needed")
    return centers


def check_tau(tau: object) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a real number, got {type(tau).__name__}")
    value = float(tau)
    rule = tau_rule_broken(value)
    if rule is not None:
        raise ValueError(f"bad tau {value}: {rule}")
    return value


def tau_rule_broken(tau: float) -> Optional[str]:
    """The crate's one tau rule (`ccpl::Tau`), in Python so that `torch.compile` traces it (an
    extension call would break the graph); `_ccpl.check_tau` is the crate's own, and the tests
    check that the two agree."""
    if not math.isfinite(tau):
        return "tau is not finite"
    if tau <= 0.0:
        return "tau is not > 0"
    if tau < TAU_MIN:
        return "2/tau overflows float32 (tau must be at least 2/f32::MAX, about 5.88e-39)"
    return None


# The smallest tau the kernels can compute with (`ccpl::Tau::MIN`, 2/f32::MAX: the row loss is
# formed in float32 at 2/tau), from the crate itself.
TAU_MIN: float = _ccpl.TAU_MIN


def saved_dtypes(dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes of what a loss's forward keeps for its backward from inputs of `dtype`: rows
    and row statistics. On CUDA, what the kernels keep (the inputs' dtype, float32); on the
    CPU, float64 for both."""
    if device.type == "cuda":
        return dtype, torch.float32
    return torch.float64, torch.float64


def saved_row_sets(device: torch.device) -> int:
    """How many `(B, S, C)` row sets a loss's forward keeps: the normalised rows of q and k,
    and on the CPU also the rows they were normalised from (the float64 reference's backward
    reads them; the kernels' never does)."""
    return 2 if device.type == "cuda" else 4


def saved_like(like: Tensor, dtype: torch.dtype, shape: tuple[int, int, int]):
    """Empty outputs of a loss's forward for inputs of `dtype` whose rows are `shape`
    `(B, S, C)`: the loss, the rows kept for the backward (`saved_row_sets` of them) and the
    row statistics `(4, B, S)` (norms of q, of k, logsumexp, loss)."""
    b, s, c = shape
    rows_dtype, stats_dtype = saved_dtypes(dtype, like.device)
    return (
        like.new_empty((), dtype=loss_dtype(dtype)),
        like.new_empty((saved_row_sets(like.device), b, s, c), dtype=rows_dtype),
        like.new_empty((4, b, s), dtype=stats_dtype),
    )


def check_saved(
    saved_rows: object, stats: object, dtype: torch.dtype, shape: tuple[int, int, int]
) -> Tensor:
    """What a loss's forward kept, as `saved_like` makes it for inputs of `dtype` whose rows are
    `shape`: a direct call of a backward op with anything else is refused before any work."""
    saved_rows = check_tensor("saved rows", saved_rows)
    stats = check_tensor("saved statistics", stats)
    for name, t, want_dtype, want_shape in zip(
        ("saved rows", "saved statistics"),
        (saved_rows, stats),
        saved_dtypes(dtype, saved_rows.device),
        ((saved_row_sets(saved_rows.device), *shape), (4, *shape[:2])),
    ):
        if t.device != saved_rows.device:
            raise ValueError(f"{name} is on {t.device} but the saved rows are on {saved_rows.device}")
        if t.dtype != want_dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, the forward keeps {want_dtype}")
        if tuple(t.shape) != want_shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, the forward keeps {want_shape}")
        if not t.is_contiguous():
            raise ValueError(f"{name} is not contiguous (strides {t.stride()})")
    return saved_rows


def check_upstream(grad: object, device: torch.device) -> Tensor:
    """The upstream gradient of a loss: one floating-point value on the loss's device."""
    grad = check_tensor("grad", grad)
    if not grad.is_floating_point():
        raise TypeError(f"grad (the loss's upstream gradient) has dtype {grad.dtype}")
    if grad.numel() != 1:
        raise ValueError(f"grad must be one value (the loss's), got shape {tuple(grad.shape)}")
    if grad.device != device:
        raise ValueError(f"grad is on {grad.device} but the saved tensors are on {device}")
    return grad


def check_feature_size(size: object) -> tuple[int, int, int, int]:
    """The `(B, C, H, W)` of a feature map a backward op is to produce."""
    if not isinstance(size, (list, tuple)) or len(size) != 4:
        raise ValueError(f"size must be a feature map's (B, C, H, W), got {size!r}")
    if any(isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 1 for n in size):
        raise ValueError(f"size must be four positive ints (B, C, H, W), got {size!r}")
    b, c, h, w = size
    return b, c, h, w


def empty_feature(like: Tensor, size: tuple[int, ...], last: bool, dtype: torch.dtype) -> Tensor:
    """An uninitialised feature map of `size` on `like`'s device, channels last or not."""
    layout = torch.channels_last if last else torch.contiguous_format
    return torch.empty(size, dtype=dtype, device=like.device, memory_format=layout)


def first_order_only(op: str, grads: list) -> list:
    """The gradients a backward returns, made to refuse a second differentiation: the ops have
    no derivative of their backward, so under `create_graph=True` (grad mode on in the
    backward) each gradient is tied to a node that raises, naming the op, when it is
    differentiated again, instead of being a constant that silently gives zero."""
    if not torch.is_grad_enabled():
        return grads
    present = [g for g in grads if g is not None]
    error = torch._C._functions.DelayedError(
        f"ccpl.{op} has no second derivative: its gradient cannot be differentiated again "
        "(double backward, create_graph=True)".encode(),
        len(present),
    )
    tied = error(*(g.detach().requires_grad_() for g in present))
    tied = iter((tied,) if isinstance(tied, Tensor) else tied)
    return [None if g is None else next(tied) for g in grads]


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss of inputs of `dtype`: float32 (as autocast keeps losses), float64 for float64
    inputs. The upstream gradient reaches the Rust side in it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def target(t: Tensor) -> tuple[str, Optional[int], int]:
    """`(dtype, device index, stream)` for the Rust side: PyTorch's current stream of the
    tensor's device, or no device for the CPU."""
    dtype = HOST_DTYPES[t.dtype]
    if t.device.type == "cuda":
        return dtype, t.device.index, torch.cuda.current_stream(t.device).cuda_stream
    return dtype, None, 0


def upstream_of(grad: Tensor, dtype: torch.dtype) -> Tensor:
    """A loss's upstream gradient as the Rust side reads it: in the loss's dtype, contiguous."""
    return grad.to(loss_dtype(dtype)).contiguous()


def backward_buffers(saved: tuple, upstream: Tensor, grads: list, scratch_sets: int) -> tuple:
    """What a loss's native backward reads and writes: the forward's `saved` rows and
    statistics, the `upstream` gradient (`upstream_of`), on CUDA a scratch of `scratch_sets`
    row sets `(B, S, C)` like the saved rows, the gradients (q's, and k's or None). The caller
    keeps the tensors alive for the call; the scratch is returned with the buffers for that."""
    saved_rows, stats = saved
    scratch = None
    if saved_rows.is_cuda:
        scratch = saved_rows.new_empty((scratch_sets, *saved_rows.shape[1:]))
    buffers = (
        (raw(saved_rows), raw(stats)),
        raw(upstream),
        raw(scratch),
        (raw(grads[0]), raw(grads[1]) if len(grads) > 1 else None),
    )
    return buffers, scratch


def raw(t: Optional[Tensor]) -> Optional[tuple[int, int]]:
    """A contiguous tensor as the Rust side takes it: its address and number of elements."""
    return None if t is None else (t.data_ptr(), t.numel())


def on_device(t: Tensor):
    """The tensor's CUDA device made current for the call (the Rust side launches in that
    device's context), or nothing on the CPU."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def centers_call(native, like: Tensor, size, last: bool, centers: Tensor, *args) -> None:
    """Calls the native op `native` of a `size` `(B, C, H, W)` feature map (channels `last` or
    not) at `centers`, on the device, dtype and stream of `like`: with `(dtype, device, stream)`,
    the geometry, the centres and their device table, then `args`."""
    centers = centers.contiguous()
    b, c, h, w = size
    with on_device(like):
        table = centers_table(centers, h, w, like.device)
        native(target(like), ((b, c, h, w, last), raw(centers), raw(table)), *args)


def centers_table(centers: Tensor, height: int, width: int, device: torch.device):
    """On CUDA, the centres as the kernels read them: checked and laid out on the host (the
    `N` flat indices, then the index of the centre at each of the `H*W` positions or -1), in
    pinned memory, and copied to the device on the current stream without a wait. `None` on
    the CPU, where the Rust side reads `centers` itself."""
    if device.type != "cuda":
        return None
    table = torch.empty(centers.numel() + height * width, dtype=torch.int32, pin_memory=True)
    _ccpl.center_table(height, width, raw(centers), raw(table))
    return table.to(device, non_blocking=True)


def deterministic() -> bool:
    """PyTorch's switch for deterministic algorithms picks the deterministic scatter of the
    neighbour differences' backward (the same bits on every run); otherwise the atomic one."""
    return torch.are_deterministic_algorithms_enabled()


def warn_without_kernels(cuda_available: bool, built: bool) -> None:
    """At import: a package built without its CUDA kernels (a deliberate CPU-only build,
    `CCPL_CPU_ONLY=1`) says so where a GPU could run them, rather than at the first CUDA call."""
    if cuda_available and not built:
        warnings.warn(
            "ccpl was built without its CUDA kernels (a CPU-only build): ops on CUDA tensors "
            "will raise; install the ccpl wheel, or build with a CUDA compiler",
            RuntimeWarning,
            stacklevel=3,
        )
