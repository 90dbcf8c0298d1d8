//! NVRTC, the CUDA runtime compiler library, called by the build script: the CUDA 12 wheels on
//! PyPI ship it (and ptxas) but no `nvcc` driver, so the default build compiles the kernels to
//! PTX with NVRTC and the PTX to cubins with ptxas. Only the handful of entry points the build
//! needs, loaded from the library at `path`.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};

type Program = *mut c_void;
type Status = c_int;

/// The NVRTC library, loaded.
pub struct Nvrtc {
    lib: libloading::Library,
}

impl Nvrtc {
    /// Loads NVRTC from `path` (`libnvrtc.so.12`).
    pub fn load(path: &Path) -> Result<Self, String> {
        // SAFETY: loading NVRTC runs only its initialisers.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("NVRTC ({}) could not be loaded: {e}", path.display()))?;
        Ok(Self { lib })
    }

    fn symbol<F: Copy>(&self, name: &str) -> Result<F, String> {
        // SAFETY: every caller names an NVRTC function with the signature `F` of nvrtc.h.
        unsafe { self.lib.get::<F>(name.as_bytes()) }
            .map(|f| *f)
            .map_err(|e| format!("NVRTC has no {name}: {e}"))
    }

    /// `(major, minor)` of the CUDA release NVRTC belongs to.
    pub fn version(&self) -> Result<(u32, u32), String> {
        let f: unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status =
            self.symbol("nvrtcVersion")?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-parameters, as nvrtc.h declares.
        self.check(unsafe { f(&mut major, &mut minor) }, "nvrtcVersion")?;
        Ok((major as u32, minor as u32))
    }

    /// The compute capabilities NVRTC compiles for (75, 80, ...).
    pub fn supported_archs(&self) -> Result<Vec<u32>, String> {
        let count_fn: unsafe extern "C" fn(*mut c_int) -> Status =
            self.symbol("nvrtcGetNumSupportedArchs")?;
        let list_fn: unsafe extern "C" fn(*mut c_int) -> Status =
            self.symbol("nvrtcGetSupportedArchs")?;
        let mut count = 0;
        // SAFETY: one out-parameter, then an array of that many ints, as nvrtc.h declares.
        self.check(unsafe { count_fn(&mut count) }, "nvrtcGetNumSupportedArchs")?;
        let mut archs: Vec<c_int> = vec![0; count.max(0) as usize];
        self.check(
            unsafe { list_fn(archs.as_mut_ptr()) },
            "nvrtcGetSupportedArchs",
        )?;
        Ok(archs.into_iter().map(|a| a as u32).collect())
    }

    fn check(&self, status: Status, what: &str) -> Result<(), String> {
        if status == 0 {
            return Ok(());
        }
        let message = self
            .symbol::<unsafe extern "C" fn(Status) -> *const c_char>("nvrtcGetErrorString")
            // SAFETY: NVRTC returns a static NUL-terminated string for every status.
            .map(|f| {
                unsafe { CStr::from_ptr(f(status)) }
                    .to_string_lossy()
                    .into_owned()
            })
            .unwrap_or_else(|_| format!("status {status}"));
        Err(format!("{what}: {message}"))
    }

    /// PTX for `compute_{arch}` of the CUDA C++ file `source`, with `options` added to the
    /// architecture; Err carries NVRTC's log.
    pub fn compile_ptx(
        &self,
        source: &Path,
        arch: u32,
        options: &[String],
    ) -> Result<String, String> {
        type Create = unsafe extern "C" fn(
            *mut Program,
            *const c_char,
            *const c_char,
            c_int,
            *const *const c_char,
            *const *const c_char,
        ) -> Status;
        type Compile = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> Status;
        type Size = unsafe extern "C" fn(Program, *mut usize) -> Status;
        type Text = unsafe extern "C" fn(Program, *mut c_char) -> Status;
        type Destroy = unsafe extern "C" fn(*mut Program) -> Status;
        let create: Create = self.symbol("nvrtcCreateProgram")?;
        let compile: Compile = self.symbol("nvrtcCompileProgram")?;
        let log_size: Size = self.symbol("nvrtcGetProgramLogSize")?;
        let log: Text = self.symbol("nvrtcGetProgramLog")?;
        let ptx_size: Size = self.symbol("nvrtcGetPTXSize")?;
        let ptx: Text = self.symbol("nvrtcGetPTX")?;
        let destroy: Destroy = self.symbol("nvrtcDestroyProgram")?;

        let text = std::fs::read_to_string(source)
            .map_err(|e| format!("reading {}: {e}", source.display()))?;
        let text = CString::new(text).map_err(|_| format!("{}: a NUL byte", source.display()))?;
        let name = CString::new(source.to_string_lossy().as_bytes()).unwrap();
        let options: Vec<CString> = std::iter::once(format!("--gpu-architecture=compute_{arch}"))
            .chain(options.iter().cloned())
            .map(|o| CString::new(o).unwrap())
            .collect();
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();

        let mut program: Program = std::ptr::null_mut();
        // SAFETY: the strings outlive the program; no headers are passed (they come from the
        // include paths); the program is destroyed below on every path.
        self.check(
            unsafe {
                create(
                    &mut program,
                    text.as_ptr(),
                    name.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                )
            },
            "nvrtcCreateProgram",
        )?;
        let read = |size: Size, get: Text| -> Result<String, String> {
            let mut n = 0usize;
            // SAFETY: the size, then a buffer of that size, of a live program.
            self.check(unsafe { size(program, &mut n) }, "NVRTC output size")?;
            let mut buffer = vec![0u8; n.max(1)];
            self.check(
                unsafe { get(program, buffer.as_mut_ptr().cast()) },
                "NVRTC output",
            )?;
            let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
            Ok(String::from_utf8_lossy(&buffer[..end]).into_owned())
        };
        // SAFETY: a live program and `option_ptrs.len()` valid option strings.
        let status = unsafe { compile(program, option_ptrs.len() as c_int, option_ptrs.as_ptr()) };
        let result = match self.check(status, "nvrtcCompileProgram") {
            Ok(()) => read(ptx_size, ptx),
            Err(e) => Err(format!("{e}\n{}", read(log_size, log).unwrap_or_default())),
        };
        // SAFETY: the program created above, destroyed once.
        unsafe { destroy(&mut program) };
        result
    }
}

/// The CUDA 12 wheels' tree as `scripts/bootstrap` links it: `root` is their `nvidia/` folder.
pub struct Wheels {
    pub nvrtc: PathBuf,
    pub ptxas: PathBuf,
    pub include: Vec<PathBuf>,
}

impl Wheels {
    pub fn at(root: &Path) -> Self {
        Self {
            nvrtc: root.join("cuda_nvrtc/lib/libnvrtc.so.12"),
            ptxas: root.join("cuda_nvcc/bin/ptxas"),
            // cuda_fp16.h/cuda_bf16.h, crt/ (mma.h), libcu++.
            include: [
                "cuda_runtime/include",
                "cuda_nvcc/include",
                "cuda_cccl/include",
            ]
            .iter()
            .map(|dir| root.join(dir))
            .collect(),
        }
    }
}
