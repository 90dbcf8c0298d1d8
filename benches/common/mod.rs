//! What the benches share: the configurations of `benches/configs.txt` (the list the PyTorch
//! baselines read too: training steps of the multi-layer loss, layers, rows), the device or a
//! loud skip, timing with CUDA events, the rotation of input sets past the L2, the loss from
//! head rows, the status lines (`ccpl-bench {json}`) that `tools/bench/report.py` reads from
//! the log, and a seeded generator.
#![allow(dead_code)] // each bench binary uses its own part

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use ccpl::cuda::info_nce::{self as nce, Side};
use ccpl::cuda::{self, Kernels, normalize, similarity};
use ccpl::{Dtype, FeatureShape, Layout, RowShape, Tau};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, sys};

/// The configuration list, compiled in so a bench binary runs anywhere.
const CONFIGS: &str = include_str!("../configs.txt");

/// Where a configuration's loss starts.
#[derive(Debug, Clone)]
pub enum Suite {
    /// A training step of the multi-layer loss: every layer's two feature maps (identity
    /// head), each layer's shape and the `num_s` centres asked for, in layer order.
    Step { layers: Vec<(FeatureShape, usize)> },
    /// From two feature maps, identity head; `num_s` centres asked for.
    Layer { shape: FeatureShape, num_s: usize },
    /// From head output rows; `grad_k`: the content side gets a gradient too.
    Rows { rows: RowShape, grad_k: bool },
}

/// One line of `configs.txt`.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub tag: String,
    pub suite: Suite,
    pub dtypes: Vec<String>,
}

impl Config {
    /// The row matrices the loss works on: `(B, 8 min(num_s, interior), C)` for a layer; none
    /// for a step, whose rows are its layers'.
    pub fn rows(&self) -> Option<RowShape> {
        match self.suite {
            Suite::Step { .. } => None,
            Suite::Layer { shape, num_s } => {
                let s = 8 * num_s.min(shape.interior());
                Some(
                    RowShape::new(shape.batch(), s, shape.channels())
                        .expect("configs.txt: valid rows"),
                )
            }
            Suite::Rows { rows, .. } => Some(rows),
        }
    }
    /// Whether the content side gets a gradient.
    pub fn grad_k(&self) -> bool {
        matches!(self.suite, Suite::Rows { grad_k: true, .. })
    }
}

/// Every configuration of `configs.txt` (or of the file `CCPL_BENCH_CONFIGS` names: the dry
/// run's tiny stand-ins), in file order (the order of importance); only those whose tag is
/// listed in `CCPL_BENCH_TAGS` (comma-separated) when it is set, and only the `config/dtype`
/// pairs listed in `CCPL_BENCH_ONLY` (comma-separated) when it is set: the benchmark runner
/// selects each phase's part with it (tools/bench/run.py; tools/bench/common.py reads the
/// same variables).
pub fn configs() -> Vec<Config> {
    let text = match std::env::var("CCPL_BENCH_CONFIGS") {
        Ok(path) => std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("CCPL_BENCH_CONFIGS={path}: {e}")),
        Err(_) => CONFIGS.to_string(),
    };
    let tags = std::env::var("CCPL_BENCH_TAGS").unwrap_or_default();
    let only = std::env::var("CCPL_BENCH_ONLY").unwrap_or_default();
    if let Some(bad) = only
        .split(',')
        .find(|e| !only.is_empty() && !e.contains('/'))
    {
        panic!("CCPL_BENCH_ONLY: `{bad}` is not config/dtype");
    }
    let wanted_tag = |cfg: &Config| tags.is_empty() || tags.split(',').any(|t| t == cfg.tag);
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .map(|line| {
            parse_config(line).unwrap_or_else(|e| panic!("benches/configs.txt: {e}: `{line}`"))
        })
        .filter(wanted_tag)
        .filter_map(|mut cfg| {
            if !only.is_empty() {
                let listed = |d: &String| {
                    only.split(',')
                        .any(|entry| entry.trim() == format!("{}/{d}", cfg.name))
                };
                cfg.dtypes.retain(listed);
            }
            (!cfg.dtypes.is_empty()).then_some(cfg)
        })
        .collect()
}

/// Whether the criterion group `name` is to be timed: `CCPL_BENCH_GROUPS` (comma-separated)
/// lists them when it is set.
pub fn group_wanted(name: &str) -> bool {
    let groups = std::env::var("CCPL_BENCH_GROUPS").unwrap_or_default();
    groups.is_empty() || groups.split(',').any(|g| g.trim() == name)
}

/// `CCPL_BENCH_DRY_RUN=1`: the benches time the CPU reference under their GPU names, to
/// exercise the benchmark runner without a GPU.
pub fn dry_run() -> bool {
    std::env::var("CCPL_BENCH_DRY_RUN").as_deref() == Ok("1")
}

fn parse_config(line: &str) -> Result<Config, String> {
    let mut words = line.split_whitespace();
    let suite = words.next().ok_or("empty line")?;
    let fields: Vec<(&str, &str)> = words
        .map(|w| w.split_once('=').ok_or(format!("`{w}` is not key=value")))
        .collect::<Result<_, _>>()?;
    let get = |key: &str| {
        fields
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .ok_or(format!("no {key}="))
    };
    let num = |key: &str| {
        get(key)?
            .parse::<usize>()
            .map_err(|e| format!("{key}: {e}"))
    };
    let suite = match suite {
        "step" => {
            // One layer per entry of the C, H and W lists, the same B and num_s for all.
            let list = |key: &str| -> Result<Vec<usize>, String> {
                get(key)?
                    .split(',')
                    .map(|v| v.parse::<usize>().map_err(|e| format!("{key}: {e}")))
                    .collect()
            };
            let (c, h, w) = (list("C")?, list("H")?, list("W")?);
            if c.len() != h.len() || c.len() != w.len() {
                return Err("C, H and W must list as many layers".into());
            }
            let (batch, num_s) = (num("B")?, num("num_s")?);
            let layers = (0..c.len())
                .map(|l| {
                    FeatureShape::new(batch, c[l], h[l], w[l], Layout::Nchw)
                        .map(|shape| (shape, num_s))
                        .map_err(|e| e.to_string())
                })
                .collect::<Result<_, _>>()?;
            Suite::Step { layers }
        }
        "layer" => Suite::Layer {
            shape: FeatureShape::new(num("B")?, num("C")?, num("H")?, num("W")?, Layout::Nchw)
                .map_err(|e| e.to_string())?,
            num_s: num("num_s")?,
        },
        "rows" => Suite::Rows {
            rows: RowShape::new(num("B")?, num("S")?, num("D")?).map_err(|e| e.to_string())?,
            grad_k: match get("grads")? {
                "q" => false,
                "qk" => true,
                other => return Err(format!("grads must be q or qk, not {other}")),
            },
        },
        other => return Err(format!("unknown suite {other}")),
    };
    Ok(Config {
        name: get("name")?.to_string(),
        tag: get("tag")?.to_string(),
        suite,
        dtypes: get("dtypes")?.split(',').map(str::to_string).collect(),
    })
}

/// The error of a configuration naming a type that `ccpl::dispatch_dtype!` does not take.
pub fn unknown_dtype(name: &str) -> ccpl::Error {
    ccpl::Error::Dtype(format!("configs.txt: unknown dtype {name}"))
}

/// Size in bytes of one element of a storage type.
pub fn element_bytes<T: Dtype>() -> usize {
    std::mem::size_of::<T>()
}

/// The device, its default stream, the loaded kernels and the L2 size.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub kernels: Arc<Kernels>,
    pub l2_bytes: usize,
    pub name: String,
}

impl Gpu {
    /// Free device memory in bytes, read after a synchronisation of the context (every
    /// stream): cudarc allocates and frees on a stream, and the memory pool takes memory and
    /// gives it back at a synchronisation, so without one the reading lags what is held.
    pub fn free_bytes(&self) -> ccpl::Result<usize> {
        self.ctx.synchronize()?;
        Ok(self.ctx.mem_get_info()?.0)
    }
    /// Why `bytes` more would not fit in the free device memory (with 5% slack), or `None`.
    pub fn does_not_fit(&self, bytes: usize) -> ccpl::Result<Option<String>> {
        let free = self.free_bytes()?;
        Ok((bytes as f64 > 0.95 * free as f64).then(|| {
            format!(
                "needs {:.2} GB, {:.2} GB free",
                bytes as f64 / 1e9,
                free as f64 / 1e9
            )
        }))
    }
    /// How many input sets of `set_bytes` to rotate through: enough that one pass over them is
    /// at least twice the L2 where 8 sets suffice (a small configuration's 8 sets may still
    /// fit the L2: BENCHMARKS.md, "Timing"), within a quarter of the free memory.
    pub fn input_sets(&self, set_bytes: usize) -> ccpl::Result<usize> {
        let want = (2 * self.l2_bytes).div_ceil(set_bytes.max(1)).clamp(1, 8);
        Ok(want.min((self.free_bytes()? / 4 / set_bytes.max(1)).max(1)))
    }
}

/// The GPU, or `None` after saying loudly that `bench` skipped (and exiting with an error
/// when `CCPL_REQUIRE_GPU=1`, so a GPU run cannot pass by skipping).
pub fn gpu(bench: &str) -> Option<Gpu> {
    let found = cuda::context(0).and_then(|ctx| Ok((Kernels::for_context(&ctx)?, ctx)));
    match found {
        Ok((kernels, ctx)) => {
            let l2 = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE);
            let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
            eprintln!("{bench}: benchmarking on {name}");
            Some(Gpu {
                stream: ctx.default_stream(),
                l2_bytes: l2.map(|b| b as usize).unwrap_or(50 << 20),
                kernels,
                ctx,
                name,
            })
        }
        Err(e) => {
            eprintln!();
            eprintln!("************************************************************************");
            eprintln!(
                "SKIPPED: the `{bench}` benches need a CUDA GPU and the embedded kernels: {e}"
            );
            eprintln!("************************************************************************");
            status(bench, "skipped", &[("reason", Field::Str(e.to_string()))]);
            if std::env::var("CCPL_REQUIRE_GPU").as_deref() == Ok("1") {
                eprintln!("CCPL_REQUIRE_GPU=1: failing instead of skipping");
                std::process::exit(1);
            }
            None
        }
    }
}

/// The time of `iters` calls of `step(i)` on `stream`, between two CUDA events recorded
/// around them (the host enqueues them back to back; the wait is after the end event).
pub fn time_iters(stream: &CudaStream, iters: u64, mut step: impl FnMut(usize)) -> Duration {
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = stream.record_event(timing).expect("record the start event");
    for i in 0..iters {
        step(i as usize);
    }
    let end = stream.record_event(timing).expect("record the end event");
    let ms = start
        .elapsed_ms(&end)
        .expect("a launch failed while timing");
    Duration::from_secs_f64(f64::from(ms) / 1e3)
}

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => format!("panicked: {s}"),
        (_, Some(s)) => format!("panicked: {s}"),
        _ => "panicked".into(),
    }
}

/// A value of a status line.
pub enum Field {
    Str(String),
    Num(f64),
    Bool(bool),
}

/// Prints `ccpl-bench {"id": ..., "status": ..., fields}` on stdout: what the report cannot
/// read from criterion (skips, sizes that do not fit, memory, checks).
pub fn status(id: &str, status: &str, fields: &[(&str, Field)]) {
    let mut line = format!(
        "ccpl-bench {{\"id\": {}, \"status\": {}",
        json_str(id),
        json_str(status)
    );
    for (key, value) in fields {
        let value = match value {
            Field::Str(s) => json_str(s),
            Field::Num(x) if x.is_finite() => format!("{x}"),
            Field::Num(_) => "null".into(),
            Field::Bool(b) => b.to_string(),
        };
        let _ = write!(line, ", {}: {value}", json_str(key));
    }
    println!("{line}}}");
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub use ccpl_testkit::Rng;

/// `len` values uniform in `[-1, 1)`, rounded to `T`: the host copy (for checks) and the
/// device copy. Random data, never zeros (they can run faster than real data).
pub fn random<T: Dtype>(
    gpu: &Gpu,
    len: usize,
    rng: &mut Rng,
) -> ccpl::Result<(Vec<T>, CudaSlice<T>)> {
    let host: Vec<T> = (0..len).map(|_| T::from_f64(rng.symmetric())).collect();
    let device = gpu.stream.clone_htod(&host)?;
    Ok((host, device))
}

/// The loss from head output rows, composed of the crate's kernels in the order its layer
/// loss runs them: normalise both sides, logits, per-row cross-entropy, mean; backward into
/// the normalised rows of `q` (and `k`), back through the normalisation.
pub struct RowsLoss<T: Dtype> {
    pub shape: RowShape,
    pub unit_q: CudaSlice<T>,
    pub unit_k: CudaSlice<T>,
    pub norms_q: CudaSlice<f32>,
    pub norms_k: CudaSlice<f32>,
    pub logits: CudaSlice<f32>,
    pub row_lse: CudaSlice<f32>,
    pub row_loss: CudaSlice<f32>,
    pub loss: CudaSlice<f32>,
    pub one: CudaSlice<f32>,
    pub grad_unit: CudaSlice<T>,
}

impl<T: Dtype> RowsLoss<T> {
    /// Bytes of the workspace for `shape`.
    pub fn workspace_bytes(shape: &RowShape) -> usize {
        let stats = shape.batch() * shape.rows();
        3 * shape.len() * element_bytes::<T>() + 4 * (shape.logits_len() + 4 * stats + 2)
    }

    pub fn new(gpu: &Gpu, shape: RowShape) -> ccpl::Result<Self> {
        let stats = shape.batch() * shape.rows();
        let s = &gpu.stream;
        Ok(Self {
            shape,
            unit_q: s.alloc_zeros(shape.len())?,
            unit_k: s.alloc_zeros(shape.len())?,
            norms_q: s.alloc_zeros(stats)?,
            norms_k: s.alloc_zeros(stats)?,
            logits: s.alloc_zeros(shape.logits_len())?,
            row_lse: s.alloc_zeros(stats)?,
            row_loss: s.alloc_zeros(stats)?,
            loss: s.alloc_zeros(1)?,
            one: s.clone_htod(&[1.0f32])?,
            grad_unit: s.alloc_zeros(shape.len())?,
        })
    }

    /// Normalisation of both sides, logits, row statistics, the loss.
    pub fn forward(
        &mut self,
        gpu: &Gpu,
        rows_q: &CudaSlice<T>,
        rows_k: &CudaSlice<T>,
    ) -> ccpl::Result<()> {
        let (k, s, shape) = (&*gpu.kernels, &*gpu.stream, &self.shape);
        normalize::normalize_rows(k, s, shape, rows_q, &mut self.unit_q, &mut self.norms_q)?;
        normalize::normalize_rows(k, s, shape, rows_k, &mut self.unit_k, &mut self.norms_k)?;
        similarity::similarity(
            k,
            s,
            shape,
            Tau::DEFAULT,
            &self.unit_q,
            &self.unit_k,
            &mut self.logits,
        )?;
        nce::info_nce_forward(
            k,
            s,
            shape,
            &self.logits,
            &mut self.row_lse,
            &mut self.row_loss,
        )?;
        nce::info_nce_loss(k, s, &self.row_loss, &mut self.loss, false)
    }

    /// The gradient of the loss into the rows of `side`, written to `grad`.
    pub fn backward(
        &mut self,
        gpu: &Gpu,
        side: Side,
        rows: &CudaSlice<T>,
        grad: &mut CudaSlice<T>,
    ) -> ccpl::Result<()> {
        let (k, s, shape) = (&*gpu.kernels, &*gpu.stream, &self.shape);
        let (other, norms) = match side {
            Side::Q => (&self.unit_k, &self.norms_q),
            Side::K => (&self.unit_q, &self.norms_k),
        };
        nce::info_nce_backward(
            k,
            s,
            shape,
            Tau::DEFAULT,
            side,
            &self.logits,
            &self.row_lse,
            &self.row_loss,
            other,
            &self.one,
            &mut self.grad_unit,
        )?;
        normalize::normalize_rows_backward(k, s, shape, rows, norms, &self.grad_unit, grad)
    }
}
