//! The emulator library's objects, compiled once per content. Every translation unit is compiled
//! from its preprocessed, rewritten text, keyed by a hash of that text and of the compiler's
//! command line, and kept in `OUT_DIR/objects`: a rebuild compiles only the units whose text
//! changed (one kernel family when it is edited, the families that include a header when the
//! header is), and a text seen just before (an edit undone, a planted bug removed) not at all.

use crate::parallel::parallel;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// Objects kept per unit, the most recently used: the one in use and the one before it.
const KEPT_PER_UNIT: usize = 2;

/// The object of every source, in order: `text_of(source, build)` (the text to compile, as the
/// source's build preprocesses it) is written to
/// `out/rewritten/` and compiled by the source's build, unless the same text was compiled by
/// the same command before: then its object is taken from `out/objects/`. Sources go in
/// parallel.
pub fn compile(
    sources: &[(PathBuf, &cc::Build)],
    out: &Path,
    text_of: impl Fn(&Path, &cc::Build) -> String + Sync,
) -> Vec<PathBuf> {
    let rewritten = out.join("rewritten");
    let cache = out.join("objects");
    fs::create_dir_all(&rewritten).unwrap();
    fs::create_dir_all(&cache).unwrap();
    let objects = parallel(sources, |&(ref source, base)| {
        let compiler = base.get_compiler();
        let command: Vec<&OsStr> = std::iter::once(compiler.path().as_os_str())
            .chain(compiler.args().iter().map(|a| a.as_os_str()))
            .collect();
        let unit = source.file_name().unwrap().to_string_lossy();
        let text = text_of(source, base);
        let mut hasher = DefaultHasher::new();
        command.hash(&mut hasher);
        text.hash(&mut hasher);
        let object = cache.join(format!("{unit}-{:016x}.o", hasher.finish()));
        // Written either way: the text behind every object, for diagnostics and for the
        // planted-bug check (its line markers name every file the unit includes).
        let path = rewritten.join(format!("{unit}.cpp"));
        fs::write(&path, text).unwrap();
        if object.exists() {
            // Marks it as used, for `prune`.
            fs::File::options()
                .append(true)
                .open(&object)
                .and_then(|f| f.set_modified(SystemTime::now()))
                .unwrap_or_else(|e| panic!("{}: {e}", object.display()));
        } else {
            let built = base
                .clone()
                .file(&path)
                .out_dir(&rewritten)
                .compile_intermediates();
            fs::rename(&built[0], &object).unwrap();
        }
        object
    });
    let units: Vec<String> = sources
        .iter()
        .map(|(s, _)| s.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    prune(&cache, &units);
    objects
}

/// Deletes every object but the [`KEPT_PER_UNIT`] most recently used of each unit in `units`.
fn prune(cache: &Path, units: &[String]) {
    let mut objects: Vec<(SystemTime, PathBuf)> = fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (fs::metadata(&p).unwrap().modified().unwrap(), p))
        .collect();
    objects.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (_, object) in &objects {
        let name = object.file_name().unwrap().to_string_lossy();
        let unit = name.rsplit_once('-').map_or("", |(unit, _)| unit);
        let count = seen.entry(unit.to_string()).or_default();
        *count += 1;
        if *count > KEPT_PER_UNIT || !units.iter().any(|u| u == unit) {
            fs::remove_file(object).unwrap();
        }
    }
}

/// `objects` linked into the shared library `library` by `base`'s compiler (no compiler flags:
/// the objects need no runtime beyond the C++ standard library's). Its references to its own
/// symbols bind to its own definitions (`-Bsymbolic`), never to those of the emulator linked
/// into the program that loads it.
pub fn link_shared(base: &cc::Build, objects: &[PathBuf], library: &Path) {
    let compiler = base.get_compiler();
    let status = Command::new(compiler.path())
        .args(["-shared", "-Wl,-Bsymbolic", "-o"])
        .arg(library)
        .args(objects)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", compiler.path().display()));
    assert!(status.success(), "linking {} failed", library.display());
}
