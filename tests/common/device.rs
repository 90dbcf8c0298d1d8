//! Devices a kernel test runs on, so that each test is written once: the CPU emulator
//! (always) and the GPU (when there is one; else the test says loudly that it SKIPPED, and
//! fails instead when `CCPL_REQUIRE_GPU=1`). Plus the conversions and the tolerance rule the
//! kernel tests share.

use std::sync::Arc;

use ccpl::cuda::{self, CudaLauncher, Kernels};
use ccpl::launch::{Buf, KernelParams, LaunchPlan, Launcher};
use ccpl::{Element, Result};
use ccpl_emu::{self as emu, Checks, Emulator};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, ValidAsZeroBits};

/// An element type a test moves to and from a device (the storage types, f32 and i32).
pub trait Elem: DeviceRepr + ValidAsZeroBits + Copy + Default + 'static {}
impl<T: DeviceRepr + ValidAsZeroBits + Copy + Default + 'static> Elem for T {}

/// Memory and a launcher: what a kernel test needs of a device.
pub trait TestDevice {
    /// A buffer of `T` on the device.
    type Mem<T: Elem>;
    /// What executes plans.
    type Launch<'a>: Launcher
    where
        Self: 'a;
    /// For messages.
    fn name(&self) -> &'static str;
    /// Whether sizes up to S = 8192 are practical (the emulator runs small ones only).
    fn large_sizes(&self) -> bool;
    /// Whether the emulator's sanitizer checks every access (`CCPL_EMU_SANITIZE`): about three
    /// times the cost of a launch, so the tests keep to the cases that differ in their
    /// accesses ([`fixtures::regimes`](super::fixtures::regimes)).
    fn sanitized(&self) -> bool {
        false
    }
    fn upload<T: Elem>(&self, data: &[T]) -> Self::Mem<T>;
    fn download<T: Elem>(&self, mem: &Self::Mem<T>) -> Vec<T>;
    /// The buffer's address and length for a plan (written or read by the launch).
    fn buf<T: Elem>(&self, mem: &mut Self::Mem<T>) -> Buf;
    fn launcher(&self) -> Self::Launch<'_>;

    /// A buffer of `len` NaNs: an output element the kernel does not write stays NaN. On the
    /// emulator it is also memory nothing wrote, as a fresh allocation: the sanitizer's
    /// initcheck reports a launch that reads one of its elements before a launch wrote it.
    fn alloc_nan<T: Elem + Element>(&self, len: usize) -> Self::Mem<T> {
        self.upload(&vec![T::from_f64(f64::NAN); len])
    }
    /// A NaN-filled buffer of `T` of each length it is given: with `T` a workspace's storage
    /// type for its rows and `f32` for its statistics, `lengths.try_map(dev.nan_filled::<T>(),
    /// dev.nan_filled::<f32>())` is a workspace where a launch that reads what no launch wrote
    /// shows as NaN.
    fn nan_filled<T: Elem + Element>(
        &self,
    ) -> impl FnMut(&usize) -> Result<Self::Mem<T>, std::convert::Infallible> + '_ {
        |&n| Ok(self.alloc_nan::<T>(n))
    }
    /// Launches one plan and panics with the device's name on an error.
    fn run<P: KernelParams>(&self, plan: &LaunchPlan<P>) {
        self.launcher()
            .launch(plan)
            .unwrap_or_else(|e| panic!("{} on the {}: {e}", plan.kernel, self.name()));
    }
    /// Runs `plan`, which must have been made, and reads back `out`, a buffer it writes, as
    /// f64.
    fn run_and_read<P: KernelParams, T: Elem + Element>(
        &self,
        plan: ccpl::Result<LaunchPlan<P>>,
        out: &Self::Mem<T>,
    ) -> Vec<f64> {
        self.run(&plan.unwrap());
        super::tolerance::to_f64(&self.download(out))
    }
}

/// The CPU emulator: every launch scheduled by a new seed.
pub struct Emu {
    emulator: Emulator,
}

impl Emu {
    pub fn new(seed: u64) -> Self {
        // SAFETY: every plan the tests launch addresses vectors `Emu::Mem` owns, alive and
        // of the lengths the plans were validated against, for the whole launch.
        Self {
            emulator: unsafe { Emulator::new(seed) },
        }
    }
}

/// A launcher by reference.
pub struct Borrowed<'a, L>(&'a L);
impl<L: Launcher> Launcher for Borrowed<'_, L> {
    type Error = L::Error;
    fn launch<P: KernelParams>(&self, plan: &LaunchPlan<P>) -> Result<(), L::Error> {
        self.0.launch(plan)
    }
}

impl TestDevice for Emu {
    type Mem<T: Elem> = Vec<T>;
    type Launch<'a> = Borrowed<'a, Emulator>;
    fn name(&self) -> &'static str {
        "emulator"
    }
    /// Small sizes only, unless `CCPL_EMU_LARGE=1` (minutes in release mode: a check of the
    /// large sizes where there is no GPU).
    fn large_sizes(&self) -> bool {
        std::env::var("CCPL_EMU_LARGE").as_deref() == Ok("1")
    }
    fn sanitized(&self) -> bool {
        self.emulator.checks() != Checks::NONE
    }
    /// A copy of `data`, written (as an upload is) for the sanitizer's initcheck.
    fn upload<T: Elem>(&self, data: &[T]) -> Vec<T> {
        let mem = data.to_vec();
        emu::mark_written(&mem);
        mem
    }
    fn alloc_nan<T: Elem + Element>(&self, len: usize) -> Vec<T> {
        let mem = vec![T::from_f64(f64::NAN); len];
        emu::mark_unwritten(&mem);
        mem
    }
    fn download<T: Elem>(&self, mem: &Vec<T>) -> Vec<T> {
        mem.clone()
    }
    fn buf<T: Elem>(&self, mem: &mut Vec<T>) -> Buf {
        emu::buf_mut(mem)
    }
    fn launcher(&self) -> Borrowed<'_, Emulator> {
        Borrowed(&self.emulator)
    }
}

/// The first GPU, its kernels and its default stream.
pub struct Gpu {
    kernels: Arc<Kernels>,
    stream: Arc<CudaStream>,
}

impl Gpu {
    pub fn kernels(&self) -> &Arc<Kernels> {
        &self.kernels
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

/// The GPU for `test`, or `None` after saying loudly that the test SKIPPED (a panic instead
/// when `CCPL_REQUIRE_GPU=1`).
pub fn gpu(test: &str) -> Option<Gpu> {
    let found = cuda::context(0).and_then(|ctx| {
        let kernels = Kernels::for_context(&ctx)?;
        Ok(Gpu {
            kernels,
            stream: ctx.default_stream(),
        })
    });
    match found {
        Ok(gpu) => Some(gpu),
        Err(e) if std::env::var("CCPL_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("CCPL_REQUIRE_GPU=1 but {test} cannot run on a GPU: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED {test} on the GPU: {e}");
            None
        }
    }
}

impl TestDevice for Gpu {
    type Mem<T: Elem> = CudaSlice<T>;
    type Launch<'a> = CudaLauncher<'a>;
    fn name(&self) -> &'static str {
        "GPU"
    }
    /// Up to S = 8192, except under compute-sanitizer (`CCPL_SANITIZER=1`), whose
    /// instrumentation makes those sizes take minutes.
    fn large_sizes(&self) -> bool {
        std::env::var("CCPL_SANITIZER").as_deref() != Ok("1")
    }
    fn upload<T: Elem>(&self, data: &[T]) -> CudaSlice<T> {
        self.stream.clone_htod(data).expect("upload")
    }
    fn download<T: Elem>(&self, mem: &CudaSlice<T>) -> Vec<T> {
        let data = self.stream.clone_dtoh(mem).expect("download");
        self.stream.synchronize().expect("synchronize");
        data
    }
    fn buf<T: Elem>(&self, mem: &mut CudaSlice<T>) -> Buf {
        let len = mem.len();
        // One stream: the guard's event bookkeeping is not needed past this call.
        let (addr, _guard) = mem.device_ptr_mut(&self.stream);
        Buf { addr, len }
    }
    fn launcher(&self) -> CudaLauncher<'_> {
        self.kernels
            .on(&self.stream)
            .expect("the stream is the kernels' context's")
    }
}

/// Runs each named generic test `fn name<D: TestDevice>(dev: &D)` as two tests,
/// `name::emulator` and `name::gpu`.
#[macro_export]
macro_rules! on_every_device {
    ($($test:ident),+ $(,)?) => {$(
        mod $test {
            #[test]
            fn emulator() {
                super::$test(&$crate::common::device::Emu::new(0x5eed));
            }
            #[test]
            fn gpu() {
                let name = concat!(module_path!(), "::", stringify!($test));
                if let Some(gpu) = $crate::common::device::gpu(name) {
                    super::$test(&gpu);
                }
            }
        }
    )+};
}

/// The GPU for the GPU-only test named `$test`, or a return from that test where there is
/// none ([`gpu`] says it was skipped, or panics under `CCPL_REQUIRE_GPU=1`).
#[macro_export]
macro_rules! gpu_or_skip {
    ($test:expr) => {
        match $crate::common::device::gpu($test) {
            Some(gpu) => gpu,
            None => return,
        }
    };
}

/// Calls `$check::<T, _>($args...)` for every storage type, ccpl's list of them.
#[macro_export]
macro_rules! for_each_dtype {
    ($check:ident($($arg:expr),* $(,)?)) => {
        for name in ccpl::dtype::STORAGE_NAMES {
            ccpl::dispatch_dtype!(name, T => $check::<T, _>($($arg),*),
                other => unreachable!("{other} is a storage type's name"))
        }
    };
}
