//! The sanitizer's checks (`runtime/memcheck.cpp`, `runtime/shadow.cpp`, `docs/sanitizer.md`),
//! which of them a launch runs, and the buffers a launch was given.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};

/// Which of the sanitizer's checks a launch runs, as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks(u32);

impl Checks {
    /// None: the kernels run as compiled, their accesses unchecked.
    pub const NONE: Checks = Checks(0);
    /// Every global access inside a buffer the launch was given, every shared one inside the
    /// block's shared memory.
    pub const MEMCHECK: Checks = Checks(1);
    /// No read of shared memory that no thread of the block wrote, nor of a buffer's byte
    /// that nothing wrote since it was marked unwritten ([`mark_unwritten`](crate::mark_unwritten)).
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

/// What a registration says of a buffer's bytes (global initcheck).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Contents {
    /// As they were: a buffer registered again at the same start and end by the same thread
    /// keeps its state; another is written (host data).
    Kept,
    /// Every byte written: data the caller uploaded, zeroed or filled.
    Written,
    /// No byte written: a fresh allocation, or an output the caller poisoned.
    Unwritten,
}

/// One byte per byte of a buffer, nonzero once written: the runtime reads and sets them
/// during a launch (`runtime/shadow.cpp`, `initcheck_global`), so they persist across launches.
type WrittenBytes = Arc<[AtomicU8]>;

/// Which bytes of a registered buffer were written.
enum Written {
    /// All of them.
    All,
    /// None, and no launch under initcheck has been given the buffer yet (its bytes are
    /// tracked from the first one: a run without the sanitizer allocates nothing for them).
    None,
    /// Those nonzero here.
    Tracked(WrittenBytes),
}

/// A registered buffer: its end, which of its bytes were written, and the thread that
/// registered it.
struct Registered {
    end: u64,
    written: Written,
    thread: ThreadId,
}

/// Every buffer made by [`buf`](crate::buf), [`buf_mut`](crate::buf_mut) or marked by
/// [`mark_written`](crate::mark_written) or [`mark_unwritten`](crate::mark_unwritten), by
/// start. A new one replaces those it overlaps (their memory was freed and reused).
///
/// A buffer's state belongs to the thread that registered it. Host memory gives no sign of
/// being freed: a slice one thread marked unwritten, then freed, can come back from the
/// allocator at the same start and length to another thread (tests run side by side, each on
/// a thread of its own), and must not be read as unwritten there. So a slice another thread
/// registered is, to this one, a new buffer, written. (Within one thread, marking a slice
/// that reuses freed memory is the caller's part: [`mark_written`](crate::mark_written).)
static BUFFERS: Mutex<BTreeMap<u64, Registered>> = Mutex::new(BTreeMap::new());

/// Records the `bytes` at `start` as a buffer a launch may be given, its bytes as `contents`
/// says.
pub(crate) fn register(start: u64, bytes: usize, contents: Contents) {
    // Buffers do not overlap, so ends rise with starts: those overlapping [start, end) are the
    // last ones starting before its end, back to the first that ends by its start. An empty
    // buffer counts as its start's byte.
    let end = start + bytes as u64;
    let thread = thread::current().id();
    let mut buffers = BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
    if contents == Contents::Kept
        && buffers
            .get(&start)
            .is_some_and(|b| b.end == end && b.thread == thread)
    {
        return;
    }
    let overlapping: Vec<u64> = buffers
        .range(..end.max(start + 1))
        .rev()
        .take_while(|&(&s, b)| b.end.max(s + 1) > start)
        .map(|(&s, _)| s)
        .collect();
    for s in overlapping {
        buffers.remove(&s);
    }
    let written = match contents {
        Contents::Unwritten => Written::None,
        _ => Written::All,
    };
    buffers.insert(
        start,
        Registered {
            end,
            written,
            thread,
        },
    );
}

/// The buffers a launch was given: as the runtime's quadruples (start, end, the byte of the
/// parameters that holds the pointer, the address of its written bytes or 0), and those
/// written bytes, held for the launch.
pub(crate) struct Given {
    pub quadruples: Vec<u64>,
    _written: Vec<WrittenBytes>,
}

/// The buffers the parameter struct `params` points into; with `initcheck`, the bytes of those
/// marked unwritten are tracked from this launch on (a launch without it records nothing).
pub(crate) fn given(params: &[u8], initcheck: bool) -> Given {
    let mut buffers = BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
    let mut found = Vec::new();
    let mut written = Vec::new();
    for (at, word) in params.chunks_exact(8).enumerate() {
        let pointer = u64::from_ne_bytes(word.try_into().expect("8 bytes"));
        if pointer == 0 {
            continue;
        }
        let Some((&start, buffer)) = buffers.range_mut(..=pointer).next_back() else {
            continue;
        };
        let inside = pointer < buffer.end || (pointer == start && start == buffer.end);
        if inside && !found.chunks_exact(4).any(|b: &[u64]| b[0] == start) {
            if initcheck && matches!(buffer.written, Written::None) {
                let bytes = (start..buffer.end).map(|_| AtomicU8::new(0)).collect();
                buffer.written = Written::Tracked(bytes);
            }
            let state = match &buffer.written {
                Written::Tracked(bytes) => {
                    written.push(bytes.clone());
                    bytes.as_ptr() as u64
                }
                _ => 0,
            };
            found.extend([start, buffer.end, (at * 8) as u64, state]);
        }
    }
    Given {
        quadruples: found,
        _written: written,
    }
}
