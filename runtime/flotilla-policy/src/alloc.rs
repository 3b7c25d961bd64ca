//! A counting global allocator: the system allocator plus, per thread, the
//! bytes allocated minus the bytes freed on that thread. The Rhai host reads
//! it to hold a hook call to the same memory cap as a Wasm instance
//! ([`crate::Limits::memory_bytes`]).
//!
//! Why an allocator: Rhai caps the size of one string, array, blob or map,
//! but nothing caps how many of them a script keeps alive at once (values
//! curried into function pointers, map keys, separate variables are each
//! within the caps), and it cannot tell how much memory a value holds. A
//! hook runs on one thread from start to end, so the growth of its thread's
//! count during the call is what the call allocated and still holds.
//!
//! The program installs it (`flotilla` and the test binaries do):
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: flotilla_policy::alloc::Counting = flotilla_policy::alloc::Counting;
//! ```
//!
//! Without it, [`installed`] is false and Rhai hooks are held to the per-value
//! caps only (a warning says so when a Rhai policy is loaded).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

thread_local! {
    /// Bytes allocated minus bytes freed by this thread (negative when it
    /// frees what others allocated). `const` with no destructor: reading and
    /// writing it never allocates, so the allocator may use it.
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting bytes per thread.
pub struct Counting;

#[inline]
fn add(bytes: isize) {
    // `try_with`: a thread being torn down has no counter any more.
    let _ = LIVE.try_with(|live| live.set(live.get().wrapping_add(bytes)));
}

// SAFETY: every call is passed on to `System` unchanged; the counting around
// it touches only a thread-local `Cell` that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        add(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// [`thread_live`] without noting that the allocator is installed: the
/// cheapest read, for a check made every few operations of a script.
#[inline]
pub fn thread_balance() -> isize {
    LIVE.try_with(Cell::get).unwrap_or(0)
}

/// Bytes this thread allocated and has not freed (a running balance: only
/// differences between two readings mean anything).
pub fn thread_live() -> isize {
    let live = LIVE.try_with(Cell::get).unwrap_or(0);
    if live != 0 && !INSTALLED.load(Ordering::Relaxed) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
    live
}

/// Whether the program counts allocations (installed [`Counting`]): any
/// thread that allocated anything has a non-zero balance.
pub fn installed() -> bool {
    if INSTALLED.load(Ordering::Relaxed) {
        return true;
    }
    let probe = Box::new([0u8; 64]);
    let before = thread_live();
    drop(std::hint::black_box(probe));
    thread_live() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_balance_follows_what_this_thread_holds() {
        assert!(
            installed(),
            "the test binary installs the counting allocator"
        );
        let before = thread_live();
        let held: Vec<Vec<u8>> = (0..8).map(|_| vec![1u8; 1 << 20]).collect();
        let grown = thread_live() - before;
        assert!(grown >= 8 << 20, "{grown}");
        drop(held);
        assert!(thread_live() - before < 1 << 16);
        // Another thread's allocations are its own.
        let before = thread_live();
        std::thread::spawn(|| std::hint::black_box(vec![0u8; 4 << 20]).len())
            .join()
            .unwrap();
        assert!((thread_live() - before).abs() < 1 << 16);
    }
}
