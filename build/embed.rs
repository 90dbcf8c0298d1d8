//! The Rust source that embeds the kernels (`OUT_DIR/kernels.rs`, included by `src/ffi`): every
//! family's PTX and cubins, ptxas's report and the toolchain, or why nothing was built.

use crate::compile::Compiled;
use crate::compiler::Compiler;
use crate::spills::spill_warnings;

use std::env;
use std::fmt::Write as _;

// Doc comments of the generated constants.
const NOT_BUILT_DOC: &str = "/// Why the kernels were not built, or `None` when they were.\n";
const IMAGES_DOC: &str = "/// Every kernel family as it was compiled.\n";
const REPORT_DOC: &str =
    "/// The whole `ptxas -v` report of the build (registers, shared memory, spills).\n";
const TOOLCHAIN_DOC: &str = "/// What compiled the kernels, when they were built.\n";

/// The constants of a build without kernels, saying `why`.
pub fn not_built(why: &str) -> String {
    format!(
        "{NOT_BUILT_DOC}pub const NOT_BUILT: Option<&str> = Some({why:?});\n\
         {IMAGES_DOC}pub const IMAGES: &[KernelImage] = &[];\n\
         {REPORT_DOC}pub const PTXAS_REPORT: &str = \"\";\n\
         {TOOLCHAIN_DOC}pub const TOOLCHAIN: Option<Toolchain> = None;\n"
    )
}

/// The constants embedding `compiled`; prints ptxas's spill warnings as cargo warnings.
pub fn embedded(compiler: &Compiler, compiled: &Compiled) -> String {
    let mut report = String::new();
    let mut code = format!(
        "{NOT_BUILT_DOC}pub const NOT_BUILT: Option<&str> = None;\n{IMAGES_DOC}pub const IMAGES: &[KernelImage] = &[\n"
    );
    for family in &compiled.families {
        let mut cubins = String::new();
        for cubin in &family.cubins {
            for warning in spill_warnings(&cubin.report) {
                println!(
                    "cargo:warning=ccpl: {}.cu sm_{}: {warning}",
                    family.name, cubin.arch
                );
            }
            report.push_str(&cubin.report);
            write!(
                cubins,
                "({}, include_bytes!({:?})), ",
                cubin.arch,
                cubin.path.to_str().unwrap()
            )
            .unwrap();
        }
        writeln!(
            code,
            "    KernelImage {{ family: {:?}, ptx_arch: {}, ptx: include_str!({:?}), cubins: &[{cubins}] }},",
            family.name,
            compiled.ptx_arch,
            family.ptx.to_str().unwrap()
        )
        .unwrap();
    }
    code.push_str("];\n");
    writeln!(
        code,
        "{REPORT_DOC}pub const PTXAS_REPORT: &str = {report:?};"
    )
    .unwrap();
    let (major, minor) = compiler.version();
    let narrowed = env::var("CCPL_CUDA_ARCH").ok();
    writeln!(
        code,
        "{TOOLCHAIN_DOC}pub const TOOLCHAIN: Option<Toolchain> = Some(Toolchain {{ compiler: {:?}, cuda: ({major}, {minor}), arch_list: {narrowed:?} }});",
        compiler.describe()
    )
    .unwrap();
    code
}
