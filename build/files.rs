//! File listing for the build scripts of `ccpl` and `ccpl-emu` (`#[path]`).

use std::fs;
use std::path::{Path, PathBuf};

/// Every file below `dir`, sorted, so the generated code does not depend on directory order.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("reading {}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}
