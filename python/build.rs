//! Refuses to build the extension without the CUDA kernels, unless `CCPL_CPU_ONLY=1` asks for a
//! CPU-only package on purpose: a wheel or `pip install ./python` that silently lacked them
//! would only fail at the first CUDA call (pip hides build warnings).

use std::env;

fn main() {
    println!("cargo:rerun-if-env-changed=CCPL_CPU_ONLY");
    // Set by ccpl's build script (its `links` metadata): "built" or "missing".
    let kernels = env::var("DEP_CCPL_KERNELS").unwrap_or_default();
    let cpu_only = env::var("CCPL_CPU_ONLY").is_ok_and(|v| v == "1");
    if kernels != "built" && !cpu_only {
        panic!(
            "ccpl's CUDA kernels were not built (no CUDA compiler found: run ./scripts/bootstrap, \
             or set CCPL_NVCC or CUDA_HOME; see ccpl's build warning above). Set CCPL_CPU_ONLY=1 \
             to build a package that runs on CPU tensors only."
        );
    }
}
