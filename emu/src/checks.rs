//! The sanitizer's checks (`runtime/memcheck.cpp`, `runtime/shadow.cpp`, `docs/sanitizer.md`),
//! which of them a launch runs, and the buffers a launch was given.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Which of the sanitizer's checks a launch runs, as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks(u32);

impl Checks {
    /// None: the kernels run as compiled, their accesses unchecked.
    pub const NONE: Checks = Checks(0);
    /// Every global access inside a buffer the launch was given, every shared one inside the
    /// block's shared memory.
    pub const MEMCHECK: Checks = Checks(1);
    /// No read of shared memory that no thread of the block wrote.
    pub const INITCHECK: Checks = Checks(2);
    /// No two threads of a launch on one byte, one of them writing, unordered.
    pub const RACECHECK: Checks = Checks(4);
    /// All of them.
    pub const ALL: Checks = Checks(7);

    /// The checks of every emulated launch: `CCPL_EMU_SANITIZE` (`1` or `all`: all of them,
    /// `0` or `none`: none, else a comma-separated list of `memcheck`, `initcheck`,
    /// `racecheck`), by default none: each costs about twice the unchecked time of the kernel
    /// tests (`docs/sanitizer.md`). An unknown name is an error naming it.
    pub fn from_env() -> Result<Checks, String> {
        match std::env::var("CCPL_EMU_SANITIZE") {
            Err(_) => Ok(Self::DEFAULT),
            Ok(value) => Self::parse(&value)
                .map_err(|name| format!("CCPL_EMU_SANITIZE={value:?}: no check named {name:?} (memcheck, initcheck, racecheck, all, none)")),
        }
    }

    /// The checks when `CCPL_EMU_SANITIZE` is unset.
    pub const DEFAULT: Checks = Checks::NONE;

    fn parse(value: &str) -> Result<Checks, &str> {
        let mut checks = Checks::NONE;
        for name in value.split(',').map(str::trim) {
            checks = checks.with(match name {
                "1" | "all" => Checks::ALL,
                "0" | "none" | "" => Checks::NONE,
                "memcheck" => Checks::MEMCHECK,
                "initcheck" => Checks::INITCHECK,
                "racecheck" => Checks::RACECHECK,
                other => return Err(other),
            });
        }
        Ok(checks)
    }

    /// These checks and `other`'s.
    pub const fn with(self, other: Checks) -> Checks {
        Checks(self.0 | other.0)
    }

    /// These checks without `other`'s.
    pub const fn without(self, other: Checks) -> Checks {
        Checks(self.0 & !other.0)
    }

    /// Whether every check of `other` is among these.
    pub const fn contains(self, other: Checks) -> bool {
        self.0 & other.0 == other.0
    }

    pub(crate) const fn bits(self) -> u32 {
        self.0
    }
}

/// Every buffer made by [`buf`](crate::buf) or [`buf_mut`](crate::buf_mut), by start: its end.
/// A new one replaces those it overlaps (their memory was freed and reused).
static BUFFERS: Mutex<BTreeMap<u64, u64>> = Mutex::new(BTreeMap::new());

/// Records the `bytes` at `start` as a buffer a launch may be given.
pub(crate) fn register(start: u64, bytes: usize) {
    // Buffers do not overlap, so ends rise with starts: those overlapping [start, end) are the
    // last ones starting before its end, back to the first that ends by its start. An empty
    // buffer counts as its start's byte.
    let end = start + bytes as u64;
    let mut buffers = BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
    let overlapping: Vec<u64> = buffers
        .range(..end.max(start + 1))
        .rev()
        .take_while(|&(&s, &e)| e.max(s + 1) > start)
        .map(|(&s, _)| s)
        .collect();
    for s in overlapping {
        buffers.remove(&s);
    }
    buffers.insert(start, end);
}

/// The buffers the parameter struct `params` points into, as triples of the runtime's launch:
/// start, end, and the byte of `params` that holds the pointer.
pub(crate) fn given(params: &[u8]) -> Vec<u64> {
    let buffers = BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
    let mut found = Vec::new();
    for (at, word) in params.chunks_exact(8).enumerate() {
        let pointer = u64::from_ne_bytes(word.try_into().expect("8 bytes"));
        if pointer == 0 {
            continue;
        }
        let Some((&start, &end)) = buffers.range(..=pointer).next_back() else {
            continue;
        };
        let inside = pointer < end || (pointer == start && start == end);
        if inside && !found.chunks_exact(3).any(|b: &[u64]| b[0] == start) {
            found.extend([start, end, (at * 8) as u64]);
        }
    }
    found
}
