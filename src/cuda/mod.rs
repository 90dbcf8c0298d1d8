//! The GPU path: finding a device, loading the embedded kernels once per context (one cache,
//! which the Python package and the candle ops use too), and
//! launching them on the caller's stream with the caller's buffers.
//!
//! ```no_run
//! use ccpl::cuda::{self, Kernels};
//! # fn main() -> ccpl::Result<()> {
//! let ctx = cuda::context(0)?; // Err(NoGpu) on a machine without one, never a panic
//! let kernels = Kernels::for_context(&ctx)?; // loaded once, then cached while used
//! let kept = Kernels::kept_for_device(0)?; // the same kernels, kept for the process
//! let stream = ctx.default_stream();
//! # let _ = (kernels, stream); Ok(()) }
//! ```

#[macro_use]
mod wrapper;

pub mod info_nce;
pub mod info_nce_fused;
pub mod layer;
pub mod loss;
pub mod neighbor;
pub mod normalize;
mod resident;
pub mod rows;
pub mod similarity;

pub use layer::CcpLayer;
pub use loss::CcpLoss;
pub use neighbor::{DeviceCenters, Scatter};
pub use rows::CcpRows;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};
use crate::ffi;
use crate::launch::{Buf, KernelParams, LaunchPlan, Launcher};

/// Library names of the CUDA driver, probed before cudarc is asked anything. With cudarc
/// loading libcuda at run time (ccpl's `fallback-dynamic-loading`), cudarc panics when the
/// library is missing, so the probe is what turns that into `Err(NoGpu)`; with cudarc linked
/// to it (`dynamic-linking`, as candle builds it), the library was loaded with the binary and
/// the probe finds it there.
const DRIVER_LIBRARIES: &[&str] = &["libcuda.so.1", "libcuda.so", "nvcuda.dll"];

/// Whether the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: loading libcuda runs only its initialisers, the same load cudarc does later.
    DRIVER_LIBRARIES
        .iter()
        .any(|name| unsafe { libloading::Library::new(*name) }.is_ok())
}

/// Number of CUDA devices, or `Err(NoGpu)` when there is no driver or no device.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::NoGpu(
            "the CUDA driver library (libcuda) is not installed".into(),
        ));
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err(Error::NoGpu("the CUDA driver reports no device".into())),
        Err(e) => Err(Error::NoGpu(format!(
            "the CUDA driver could not be initialised: {e}"
        ))),
    }
}

/// The primary context of device `ordinal`, or `Err(NoGpu)`.
pub fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    let n = device_count()?;
    if ordinal >= n {
        return Err(Error::NoGpu(format!(
            "device {ordinal} asked for, {n} present"
        )));
    }
    CudaContext::new(ordinal)
        .map_err(|e| Error::NoGpu(format!("device {ordinal} could not be opened: {e}")))
}

/// `Err(KernelsNotBuilt)` when the crate was built without a CUDA compiler.
pub fn kernels_built() -> Result<()> {
    match ffi::NOT_BUILT {
        Some(why) => Err(Error::KernelsNotBuilt(why)),
        None => Ok(()),
    }
}

/// The kernels loaded into one context: every family's module and a function by name.
#[derive(Debug)]
pub struct Kernels {
    ctx: Arc<CudaContext>,
    functions: HashMap<String, CudaFunction>,
}

/// The kernels loaded into one context, found again by later callers.
struct Loaded {
    /// The context's `CUcontext`.
    ctx: usize,
    /// The device whose primary context it is, once [`Kernels::kept_for_device`] asked.
    ordinal: Option<usize>,
    /// Weak, so that dropping every user unloads them...
    kernels: Weak<Kernels>,
    /// ...unless they are kept for the life of the process.
    kept: Option<Arc<Kernels>>,
}

/// Every context's loaded kernels: the one cache of the crate and of its integrations.
static LOADED: Mutex<Vec<Loaded>> = Mutex::new(Vec::new());

impl Kernels {
    /// The kernels for `ctx`: loaded on first use (the cubin for the device's architecture,
    /// else the PTX), then shared by every later caller on the same context, and unloaded when
    /// the last user drops them.
    pub fn for_context(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>> {
        Self::cached(ctx, false)
    }

    /// The same, kept loaded for the life of the process: for a framework whose users come
    /// and go (candle drops a training step's graph, and its loss objects, before the next
    /// step), so that loading (milliseconds) happens once, as the framework keeps its own
    /// modules.
    pub fn kept_for_context(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>> {
        Self::cached(ctx, true)
    }

    /// The kernels of device `ordinal`'s primary context (the one PyTorch and candle use),
    /// kept for the life of the process and found again by the ordinal alone: a call after
    /// the first is a lookup, without asking the driver for the context again.
    pub fn kept_for_device(ordinal: usize) -> Result<Arc<Kernels>> {
        let found = lock_loaded()
            .iter()
            .find(|l| l.ordinal == Some(ordinal))
            .and_then(|l| l.kept.clone());
        if let Some(kernels) = found {
            return Ok(kernels);
        }
        let kernels = Self::kept_for_context(&context(ordinal)?)?;
        let key = kernels.ctx.cu_ctx() as usize;
        if let Some(entry) = lock_loaded().iter_mut().find(|l| l.ctx == key) {
            entry.ordinal = Some(ordinal);
        }
        Ok(kernels)
    }

    /// The kernels for `ctx` from the cache, loaded there when absent; kept when `keep`.
    fn cached(ctx: &Arc<CudaContext>, keep: bool) -> Result<Arc<Kernels>> {
        kernels_built()?;
        let key = ctx.cu_ctx() as usize;
        let mut loaded = lock_loaded();
        loaded.retain(|l| l.kernels.strong_count() > 0);
        if let Some(entry) = loaded.iter_mut().find(|l| l.ctx == key)
            && let Some(kernels) = entry.kernels.upgrade()
        {
            if keep {
                entry.kept = Some(kernels.clone());
            }
            return Ok(kernels);
        }
        let kernels = Arc::new(Self::load(ctx)?);
        loaded.push(Loaded {
            ctx: key,
            ordinal: None,
            kernels: Arc::downgrade(&kernels),
            kept: keep.then(|| kernels.clone()),
        });
        Ok(kernels)
    }

    fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx.compute_capability()?;
        let arch = (major * 10 + minor) as u32;
        let mut functions = HashMap::new();
        for image in ffi::IMAGES {
            let module = load_image(ctx, image, arch)?;
            for name in entry_points(image.ptx) {
                functions.insert(name.to_string(), module.load_function(name)?);
            }
        }
        Ok(Self {
            ctx: ctx.clone(),
            functions,
        })
    }

    /// The context the kernels are loaded in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The kernel named `name`, e.g. `neighbor_diff_f32`.
    pub fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| Error::Cuda(format!("kernel {name} is not in the embedded image")))
    }

    /// A launcher that enqueues plans on `stream`, which must belong to this context.
    pub fn on<'a>(&'a self, stream: &'a CudaStream) -> Result<CudaLauncher<'a>> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::Cuda(
                "the stream belongs to another context than the kernels".into(),
            ));
        }
        Ok(CudaLauncher {
            kernels: self,
            stream,
            guards: RefCell::new(Vec::new()),
        })
    }
}

/// The cache, also after a panic elsewhere while it was held (its entries stay consistent).
fn lock_loaded() -> std::sync::MutexGuard<'static, Vec<Loaded>> {
    LOADED.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cubin for `arch` (or an older minor of the same major, which runs there), else the PTX.
fn load_image(
    ctx: &Arc<CudaContext>,
    image: &ffi::KernelImage,
    arch: u32,
) -> Result<Arc<CudaModule>> {
    let cubin = image
        .cubins
        .iter()
        .filter(|(a, _)| a / 10 == arch / 10 && *a <= arch)
        .max_by_key(|(a, _)| *a);
    if let Some((_, bytes)) = cubin {
        return Ok(ctx.load_module(Ptx::from_binary(bytes.to_vec()))?);
    }
    if image.ptx_arch <= arch {
        return Ok(ctx.load_module(Ptx::from_src(image.ptx))?);
    }
    Err(Error::Cuda(format!(
        "no kernel image for sm_{arch}: {}.cu was built for {:?} (set CCPL_CUDA_ARCH and rebuild)",
        image.family,
        image.cubins.iter().map(|(a, _)| *a).collect::<Vec<_>>()
    )))
}

/// Names of the kernels a PTX module defines (its `.entry` directives).
pub fn entry_points(ptx: &str) -> impl Iterator<Item = &str> {
    ptx.lines().filter_map(|line| {
        let rest = line.trim().split(".entry ").nth(1)?;
        Some(
            rest.split(|c: char| c == '(' || c.is_whitespace())
                .next()
                .unwrap_or(rest),
        )
    })
}

/// Executes launch plans on one CUDA stream, and collects the buffers they use: [`read`]
/// and [`write`] give a buffer's address for a plan and keep cudarc's guard of it (its
/// read/write ordering between streams) until the launcher drops, after the launches that
/// use it are enqueued. So a wrapper is: take the launcher, name its buffers, make the plan,
/// launch (the crate's wrappers do it in one call, `Kernels::launch_one`).
///
/// [`read`]: CudaLauncher::read
/// [`write`]: CudaLauncher::write
#[derive(Debug)]
pub struct CudaLauncher<'a> {
    kernels: &'a Kernels,
    stream: &'a CudaStream,
    guards: RefCell<Vec<SyncOnDrop<'a>>>,
}

impl<'a> CudaLauncher<'a> {
    /// The stream the launches go to.
    pub fn stream(&self) -> &'a CudaStream {
        self.stream
    }

    /// `slice` as a buffer the launches read.
    pub fn read<T>(&self, slice: &'a impl DevicePtr<T>) -> Buf {
        let len = slice.len();
        let (addr, guard) = slice.device_ptr(self.stream);
        self.guards.borrow_mut().push(guard);
        Buf { addr, len }
    }

    /// `slice` as a buffer the launches write.
    pub fn write<T>(&self, slice: &'a mut impl DevicePtrMut<T>) -> Buf {
        let len = slice.len();
        let (addr, guard) = slice.device_ptr_mut(self.stream);
        self.guards.borrow_mut().push(guard);
        Buf { addr, len }
    }
}

impl Kernels {
    /// The one launch that `plan` makes from the buffers it names on a launcher of `stream`:
    /// what every safe wrapper of a single kernel does. The plan is checked before anything
    /// is enqueued.
    pub(crate) fn launch_one<'a, P: KernelParams>(
        &'a self,
        stream: &'a CudaStream,
        plan: impl FnOnce(&CudaLauncher<'a>) -> Result<LaunchPlan<P>>,
    ) -> Result<()> {
        let launcher = self.on(stream)?;
        launcher.launch(&plan(&launcher)?)
    }
}

impl Launcher for CudaLauncher<'_> {
    type Error = Error;

    fn launch<P: KernelParams>(&self, plan: &LaunchPlan<P>) -> Result<()> {
        let function = self.kernels.function(&plan.kernel)?;
        let cfg = LaunchConfig {
            grid_dim: plan.grid,
            block_dim: plan.block,
            shared_mem_bytes: plan.shared_bytes,
        };
        let mut builder = self.stream.launch_builder(function);
        builder.arg(&plan.params);
        // SAFETY: the plan's struct matches the kernel's one parameter (both come from
        // kernels/ccpl.h) and its addresses were taken from buffers whose guards this
        // launcher holds (or the caller holds across this call), validated against the plan's
        // shapes.
        unsafe { builder.launch(cfg) }?;
        Ok(())
    }
}
