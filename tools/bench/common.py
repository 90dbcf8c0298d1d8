"""What the benchmark scripts share: the configuration list (benches/configs.txt, the same file
the Rust benches read), the cost model of each configuration (bytes, FLOPs, exponentials), and
JSON-lines records.

Pure Python (no numpy, no torch), so report.py runs anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
# In the repository the list is benches/configs.txt; in the device pack it sits beside us.
CONFIG_PATHS = [os.path.join(HERE, "configs.txt"), os.path.join(HERE, "..", "..", "benches", "configs.txt")]

ELEMENT_BYTES = {"f32": 4, "bf16": 2, "f16": 2}
# The criterion groups of benches/loss/ for each suite (its `groups_of`, main.rs): the headline `loss`;
# a training step's CUDA graph `loss_graph`, its `loss_user_step` and its three CcpLayers
# `loss_layers`; the layer's `loss_user_step`; the rows' `loss_materialised`.
LOSS_GROUPS = {
    "step": ("loss", "loss_graph", "loss_user_step", "loss_layers"),
    "layer": ("loss", "loss_user_step"),
    "rows": ("loss", "loss_materialised"),
}
LOGIT_BYTES = 4  # logits and per-row statistics are float32 whatever the storage type
NEIGHBORS = 8


@dataclass(frozen=True)
class Config:
    """One line of benches/configs.txt, with the derived sizes."""

    suite: str  # "step" (a training step of several layers), "layer" (from feature maps) or "rows" (from head output rows)
    name: str
    tag: str
    batch: int
    rows: int  # S
    width: int  # C for a layer, D for rows
    dtypes: tuple[str, ...]
    grads: str  # "q" or "qk"
    channels: int = 0  # layer only
    height: int = 0
    width_map: int = 0
    centers: int = 0  # N = min(num_s, interior)
    layers: tuple = ()  # step only: its layers, each a `layer` Config
    fields: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def grad_count(self) -> int:
        return len(self.grads)

    def label(self) -> str:
        if self.suite == "step":
            shapes = ", ".join(f"C={l.channels} {l.height}x{l.width_map}" for l in self.layers)
            return f"{self.name} (B={self.batch}, {len(self.layers)} layers: {shapes}; S={self.rows})"
        if self.suite == "layer":
            return f"{self.name} (B={self.batch} C={self.channels} {self.height}x{self.width_map} S={self.rows})"
        return f"{self.name} (B={self.batch} S={self.rows} D={self.width} grads={self.grads})"


def config_path() -> str:
    """CCPL_BENCH_CONFIGS when set (the dry run's tiny stand-ins, say), else configs.txt."""
    if os.environ.get("CCPL_BENCH_CONFIGS"):
        return os.environ["CCPL_BENCH_CONFIGS"]
    for path in CONFIG_PATHS:
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"configs.txt not found in {CONFIG_PATHS}")


def parse_only(text: str) -> dict[str, set[str]] | None:
    """CCPL_BENCH_ONLY: comma-separated `config/dtype` entries (the Rust benches read the same
    variable) -> {config: dtypes}; None when unset, which keeps everything."""
    if not text:
        return None
    only: dict[str, set[str]] = {}
    for entry in text.split(","):
        name, _, dtype = entry.strip().partition("/")
        if not name or not dtype:
            raise ValueError(f"CCPL_BENCH_ONLY: `{entry}` is not config/dtype")
        only.setdefault(name, set()).add(dtype)
    return only


def load_configs(path: str | None = None, selected: bool = True) -> list[Config]:
    """Parses configs.txt: `suite key=value ...` per line, `#` comments. With `selected`, only
    the tags listed in CCPL_BENCH_TAGS (comma-separated) and the `config/dtype` pairs listed in
    CCPL_BENCH_ONLY when they are set, as the Rust benches do."""
    tags = {t for t in os.environ.get("CCPL_BENCH_TAGS", "").split(",") if t} if selected else set()
    only = parse_only(os.environ.get("CCPL_BENCH_ONLY", "")) if selected else None
    out = []
    with open(path or config_path()) as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            suite, *pairs = line.split()
            kv = dict(p.split("=", 1) for p in pairs)
            try:
                cfg = _config(suite, kv)
            except (KeyError, ValueError) as e:
                raise ValueError(f"configs.txt:{lineno}: {e}: {line}") from e
            if tags and cfg.tag not in tags:
                continue
            if only is not None:
                dtypes = tuple(d for d in cfg.dtypes if d in only.get(cfg.name, ()))
                if not dtypes:
                    continue
                cfg = dataclasses.replace(cfg, dtypes=dtypes)
            out.append(cfg)
    return out


def _config(suite: str, kv: dict) -> Config:
    dtypes = tuple(kv["dtypes"].split(","))
    for d in dtypes:
        if d not in ELEMENT_BYTES:
            raise ValueError(f"unknown dtype {d}")
    common = dict(suite=suite, name=kv["name"], tag=kv["tag"], batch=int(kv["B"]), dtypes=dtypes, fields=kv)
    if suite == "step":
        # One layer per entry of the C, H and W lists (benches/common/mod.rs parses the same).
        lists = [kv[key].split(",") for key in ("C", "H", "W")]
        if len({len(values) for values in lists}) != 1:
            raise ValueError("C, H and W must list as many layers")
        layers = tuple(
            _config("layer", {**kv, "name": f"{kv['name']}.{i}", "C": c, "H": h, "W": w}) for i, (c, h, w) in enumerate(zip(*lists))
        )
        # S: the largest of the layers' (the same for all at the paper's sizes); width: all
        # layers' channels, the rows' total width.
        return Config(rows=max(l.rows for l in layers), width=sum(l.width for l in layers), grads="q", layers=layers, **common)
    if suite == "layer":
        c, h, w, num_s = int(kv["C"]), int(kv["H"]), int(kv["W"]), int(kv["num_s"])
        n = min(num_s, (h - 2) * (w - 2))
        return Config(rows=NEIGHBORS * n, width=c, grads="q", channels=c, height=h, width_map=w, centers=n, **common)
    if suite == "rows":
        grads = kv["grads"]
        if grads not in ("q", "qk"):
            raise ValueError(f"grads must be q or qk, not {grads}")
        return Config(rows=int(kv["S"]), width=int(kv["D"]), grads=grads, **common)
    raise ValueError(f"unknown suite {suite}")


def applies(cfg: Config, dtype: str, impl: str) -> bool:
    """Whether the PyTorch baseline `impl` (tools/bench/baselines.py) has a job at this
    configuration and dtype: Inf-CL computes rows at B = 1; the original's formulation starts
    from feature maps (a layer's, or every layer's of a step), and with its MLP heads it trains
    in f32."""
    maps = cfg.layers or (cfg,)
    if impl == "infcl":
        return cfg.suite == "rows" and cfg.batch == 1
    if impl == "original":
        return cfg.suite in ("step", "layer") and dtype == "f32" and all(l.channels % 4 == 0 for l in maps)
    if impl == "original-identity":
        return cfg.suite in ("step", "layer")
    return True


def touched_positions(cfg: Config, seed: int = 0) -> int:
    """Distinct positions of one feature map that a draw of N centres reads (centres and their
    8 neighbours), counted on a random draw of that size: the fewest positions a layer must
    read, and whose gradient it must write."""
    h, w, n = cfg.height, cfg.width_map, cfg.centers
    touched = set()
    for i in random.Random(seed).sample(range((h - 2) * (w - 2)), n):
        ch, cw = i // (w - 2) + 1, i % (w - 2) + 1
        touched.update((ch + dh) * w + cw + dw for dh in (-1, 0, 1) for dw in (-1, 0, 1))
    return len(touched)


@dataclass(frozen=True)
class Cost:
    """The work of one forward plus backward, counted as the fewest a perfect implementation
    needs (BENCHMARKS.md, 'The floor model')."""

    bytes_min: float  # each input read once, each output written once; no intermediate in memory
    bytes_logits: float  # extra traffic of a design that keeps the f32 logits in memory
    flops: float
    exps: float
    # What the crate's fused InfoNCE executes (kernels/info_nce_fused.cu): the forward computes
    # the logits once; each side's backward recomputes them once per 64-wide tile of the width
    # (its output is tiled over the width), then multiplies G by the other side's rows.
    flops_fused: float = 0.0
    exps_fused: float = 0.0


FUSED_WIDTH_TILE = 64  # the fused backward's tile of output columns (Gemm::kTile)


def fused_recomputes(width: int) -> int:
    """How many times one fused backward launch computes the (B, S, S) logits."""
    return -(-width // FUSED_WIDTH_TILE)


def loss_cost(cfg: Config, dtype: str) -> Cost:
    if cfg.suite == "step":  # the work of its layers
        costs = [loss_cost(layer, dtype) for layer in cfg.layers]
        return Cost(*(sum(getattr(c, f.name) for c in costs) for f in dataclasses.fields(Cost)))
    e = ELEMENT_BYTES[dtype]
    b, s, d = cfg.batch, cfg.rows, cfg.width
    if cfg.suite == "layer":
        # Read feat_q and feat_k at the touched positions, write d feat_q there.
        bytes_min = 3.0 * e * b * cfg.channels * touched_positions(cfg)
    else:
        # Read q and k rows, write the gradient of each side that gets one.
        bytes_min = float(e * b * s * d * (2 + cfg.grad_count))
    # Logits written once, read by the forward's logsumexp and by each backward product.
    bytes_logits = float(LOGIT_BYTES * b * s * s * (2 + cfg.grad_count))
    flops = 2.0 * b * s * s * d * (1 + cfg.grad_count)  # q k^T, then G k (and G^T q)
    exps = float(b * s * s)  # one exponential per logit (a backward that recomputes P doubles it)
    r = fused_recomputes(d)
    product = 2.0 * b * s * s * d  # one (B, S, S, D) matrix product
    flops_fused = product * (1 + cfg.grad_count * (r + 1))
    exps_fused = float(b * s * s) * (1 + cfg.grad_count * r)
    return Cost(bytes_min, bytes_logits, flops, exps, flops_fused, exps_fused)


def fused_cost(cost: Cost) -> Cost:
    """The fused design's own floor terms: the minimal bytes, the FLOPs and exponentials it
    executes."""
    return Cost(cost.bytes_min, 0.0, cost.flops_fused, cost.exps_fused)


def write_record(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fmt_time_ms(ms: float | None) -> str:
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "-"
    if ms < 1.0:
        return f"{ms * 1000:.1f} us"
    if ms < 1000.0:
        return f"{ms:.3g} ms"
    return f"{ms / 1000:.3g} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


# Per-kernel work, for the achieved rates of the kernel table: (bytes, FLOPs, exponentials) of
# one launch, counted as each input read once and each output written once.
KERNELS = (
    "neighbor_diff",
    "neighbor_diff_normalize",
    "neighbor_diff_backward_atomic",
    "neighbor_diff_backward_deterministic",
    "normalize_rows",
    "normalize_rows_backward",
    "similarity",
    "info_nce_forward",
    "info_nce_backward_dq",
    "info_nce_backward_dk",
    "info_nce_fused_forward",
    "info_nce_fused_backward_dq",
    "info_nce_fused_backward_dk",
)


def kernel_cost(kernel: str, cfg: Config, dtype: str) -> Cost:
    e = ELEMENT_BYTES[dtype]
    b, s, d = cfg.batch, cfg.rows, cfg.width
    rows = b * s
    if kernel == "neighbor_diff_normalize":
        # The difference rows formed and normalised in registers: the touched positions read,
        # the normalised rows and the norms written (the row's three passes hit the cache).
        feat = e * b * cfg.channels * touched_positions(cfg)
        return Cost(float(feat + rows * d * e + LOGIT_BYTES * rows), 0.0, 4.0 * rows * d, 0.0)
    if kernel.startswith("neighbor_diff"):
        p = touched_positions(cfg)
        feat = e * b * cfg.channels * p
        # forward: read the touched positions, write the rows; backward: read the rows'
        # gradient, read and write the touched positions' gradient (it accumulates).
        nbytes = feat + rows * d * e if kernel == "neighbor_diff" else rows * d * e + 2 * feat
        return Cost(float(nbytes), 0.0, 0.0, 0.0)
    if kernel == "normalize_rows":
        return Cost(float(2 * rows * d * e + LOGIT_BYTES * rows), 0.0, 3.0 * rows * d, 0.0)
    if kernel == "normalize_rows_backward":
        return Cost(float(3 * rows * d * e + LOGIT_BYTES * rows), 0.0, 5.0 * rows * d, 0.0)
    if kernel == "similarity":
        return Cost(float(2 * rows * d * e + LOGIT_BYTES * b * s * s), 0.0, 2.0 * b * s * s * d, 0.0)
    if kernel == "info_nce_forward":
        return Cost(float(LOGIT_BYTES * (b * s * s + 2 * rows)), 0.0, 0.0, float(b * s * s))
    if kernel in ("info_nce_backward_dq", "info_nce_backward_dk"):
        nbytes = LOGIT_BYTES * (b * s * s + 2 * rows) + 2 * rows * d * e  # logits, lse, row loss
        return Cost(float(nbytes), 0.0, 2.0 * b * s * s * d, float(b * s * s))
    # Fused: the rates count the work executed, recomputed logits included.
    if kernel == "info_nce_fused_forward":
        return Cost(float(2 * rows * d * e + 2 * LOGIT_BYTES * rows), 0.0, 2.0 * b * s * s * d, float(b * s * s))
    if kernel in ("info_nce_fused_backward_dq", "info_nce_fused_backward_dk"):
        r = fused_recomputes(d)
        nbytes = 3 * rows * d * e + 2 * LOGIT_BYTES * rows  # q, k, the gradient; lse, row loss
        return Cost(float(nbytes), 0.0, 2.0 * b * s * s * d * (r + 1), float(b * s * s * r))
    raise ValueError(f"unknown kernel {kernel}")


def kernels_of(cfg: Config) -> tuple[str, ...]:
    """The kernels the kernel benches time for a configuration (benches/kernels.rs, `runs`):
    none for a step, whose kernels are timed on its layers' own lines."""
    if cfg.suite == "step":
        return ()
    ks = [k for k in KERNELS if not k.endswith("_backward_dk") or cfg.grads == "qk"]
    if cfg.suite == "rows":
        ks = [k for k in ks if not k.startswith("neighbor")]
    return tuple(ks)
