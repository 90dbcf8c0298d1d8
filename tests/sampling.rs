//! Centres cost memory in proportion to their number, whatever the size of the map: drawing
//! or checking 8 centres of a 46340 x 46340 map (the largest square map within the kernels'
//! i32 range) must not allocate one entry per position (8.6 GB). Measured by the bytes this
//! thread asks the allocator for while it draws or checks; a request beyond `REFUSED` there is
//! refused (the process aborts) rather than granted, so a regression fails without taking the
//! machine's memory. The allocator serves the whole test binary: elsewhere it only forwards.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use ccpl::Centers;

/// Larger requests are refused: no call here needs anywhere near as much.
const REFUSED: usize = 64 << 20;

struct Counting;

thread_local! {
    /// Whether this thread is in [`requested`]: only then are requests counted and limited.
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static REQUESTED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator, refusing (null) only requests it would be
// allowed to refuse anyway.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if MEASURING.with(Cell::get) {
            if layout.size() > REFUSED {
                return std::ptr::null_mut();
            }
            REQUESTED.with(|r| r.set(r.get() + layout.size()));
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes this thread requested while `f` ran, and its result.
fn requested<R>(f: impl FnOnce() -> R) -> (usize, R) {
    let before = REQUESTED.with(Cell::get);
    MEASURING.with(|m| m.set(true));
    let result = f();
    MEASURING.with(|m| m.set(false));
    (REQUESTED.with(Cell::get) - before, result)
}

const SIDE: usize = 46_340;

#[test]
fn sampling_allocates_in_proportion_to_the_centres() {
    for num_s in [1, 8, 1000] {
        let (bytes, centers) = requested(|| Centers::sample(SIDE, SIDE, num_s, 7).unwrap());
        eprintln!("Centers::sample of {num_s} on {SIDE}x{SIDE}: {bytes} bytes requested");
        assert_eq!(centers.len(), num_s);
        assert!(
            bytes <= 256 * num_s + 4096,
            "{bytes} bytes for {num_s} centres"
        );
    }
}

#[test]
fn checking_centres_allocates_in_proportion_to_the_centres() {
    let flat: Vec<i64> = (1..=8).map(|i| (i * SIDE + i) as i64).collect();
    let (bytes, centers) = requested(|| Centers::from_flat(SIDE, SIDE, &flat).unwrap());
    eprintln!("Centers::from_flat of 8 on {SIDE}x{SIDE}: {bytes} bytes requested");
    assert_eq!(centers.len(), 8);
    assert!(bytes <= 4096, "{bytes} bytes for 8 centres");
    let (_, repeated) = requested(|| Centers::from_flat(SIDE, SIDE, &[flat[0], flat[0]]));
    assert!(repeated.is_err());
}
