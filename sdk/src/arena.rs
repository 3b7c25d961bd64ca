//! The argument arena: where the runner puts the nodes of a `select` or
//! `plan` call in one allocation instead of one per string.
//!
//! The canonical ABI hands every string and list of an argument to the guest
//! as an allocation of its own, made by calling the guest's `cabi_realloc`
//! once per string. For a chunk of 4096 nodes that is some 45,000 calls into
//! the guest (and as many frees when the lifted values drop), which cost more
//! than most policies' decisions. A component built with this SDK instead
//! offers the runner an *argument arena*:
//!
//! - The component carries a custom section [`SECTION`] (`v1`), so the runner
//!   knows it may ask for arena blocks. Runners that do not look for it (or
//!   components without it) use the canonical one-allocation-per-value path.
//! - The runner asks with `cabi_realloc(null, ARENA_REQUEST, align, len)`
//!   (an `old_len` that a canonical call never passes with a null pointer)
//!   and lays out records, list bodies and string bytes of the argument in
//!   that one block; each value is a disjoint sub-block.
//! - The guest's global allocator treats every pointer into the arena as an
//!   allocation it made: freeing one does nothing, growing one moves it to the
//!   heap. So the `String`s and `Vec`s that wit-bindgen lifts from the block
//!   are sound to own and drop.
//! - The SDK's export glue calls [`reset`] when a hook returns, after its
//!   arguments are dropped: the next call reuses the block. Hooks only ever see
//!   the arguments by reference (`&[Node]`, `&Node`, `&Context`), so nothing a
//!   policy keeps (a clone, a `Context::derive` result) can point into it;
//!   everything a policy allocates itself comes from the ordinary heap.
//!
//! On by default (feature `args-arena`). It installs the SDK's
//! `#[global_allocator]` (the system allocator plus the arena check) and
//! defines `cabi_realloc`; a policy that needs its own global allocator turns
//! the feature off and gets the canonical path.

/// Name of the custom section that tells the runner this component serves
/// arena requests. Its content is the protocol version, `v1`.
pub const SECTION: &str = "flotilla-args-arena";

/// The `old_len` that, with a null `old_ptr`, asks `cabi_realloc` for a block
/// of the argument arena ("FLOT").
pub const ARENA_REQUEST: usize = 0x464C_4F54;

#[cfg(all(target_arch = "wasm32", feature = "args-arena"))]
pub use imp::reset;

/// Without the arena there is nothing to reset.
#[cfg(not(all(target_arch = "wasm32", feature = "args-arena")))]
#[inline]
pub fn reset() {}

#[cfg(all(target_arch = "wasm32", feature = "args-arena"))]
mod imp {
    use super::ARENA_REQUEST;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    #[used]
    #[unsafe(link_section = "flotilla-args-arena")]
    static SECTION_CONTENT: [u8; 2] = *b"v1";

    /// Smallest block the arena takes from the heap.
    const MIN_BLOCK: usize = 64 << 10;
    /// Largest block kept between calls (a chunk of 4096 typical nodes
    /// needs about 1 MiB).
    const KEEP: usize = 8 << 20;
    /// Alignment of arena blocks (the largest a canonical-ABI value needs is 8).
    const BLOCK_ALIGN: usize = 16;

    /// Blocks outgrown during one call (each twice the last: 16 is 4 GiB).
    const RETIRED: usize = 16;

    struct Arena {
        /// The current block: `[start, end)`; `next` is the first free byte.
        start: Cell<usize>,
        end: Cell<usize>,
        next: Cell<usize>,
        /// Blocks outgrown during the current call, freed by `reset`.
        retired: [Cell<(usize, usize)>; RETIRED],
        retired_len: Cell<usize>,
    }

    /// The arena's state. A `wasm32-wasip2` component runs on one thread;
    /// only `Cell`s, so the allocator may look at it while it changes.
    struct Global(Arena);
    // SAFETY: single-threaded target (no `atomics` feature): never shared.
    unsafe impl Sync for Global {}

    static ARENA: Global = Global(Arena {
        start: Cell::new(0),
        end: Cell::new(0),
        next: Cell::new(0),
        retired: [const { Cell::new((0, 0)) }; RETIRED],
        retired_len: Cell::new(0),
    });

    /// Is `ptr` inside the current block or a retired one?
    #[inline]
    fn owns(ptr: *mut u8) -> bool {
        let a = &ARENA.0;
        let p = ptr as usize;
        p.wrapping_sub(a.start.get()) < a.end.get() - a.start.get()
            || (a.retired_len.get() != 0
                && a.retired[..a.retired_len.get()].iter().any(|r| {
                    let (s, e) = r.get();
                    p >= s && p < e
                }))
    }

    fn block(len: usize) -> Layout {
        Layout::from_size_align(len, BLOCK_ALIGN).unwrap_or_else(|_| trap())
    }

    fn trap() -> ! {
        core::arch::wasm32::unreachable()
    }

    /// `len` bytes aligned to `align` from the arena.
    fn take(align: usize, len: usize) -> *mut u8 {
        let a = &ARENA.0;
        let align = align.max(1);
        let (start, end, next) = (a.start.get(), a.end.get(), a.next.get());
        let at = next.next_multiple_of(align);
        if start != 0 && at.checked_add(len).is_some_and(|e| e <= end) {
            a.next.set(at + len);
            return at as *mut u8;
        }
        // A new block: twice the old one, at least what is asked.
        let size = len
            .checked_add(align)
            .unwrap_or_else(|| trap())
            .max(2 * (end - start))
            .max(MIN_BLOCK)
            .next_multiple_of(BLOCK_ALIGN);
        // SAFETY: non-zero size.
        let fresh = unsafe { System.alloc(block(size)) } as usize;
        if fresh == 0 {
            trap();
        }
        if start != 0 {
            if next == start {
                // SAFETY: the block came from `System.alloc` with this layout
                // and holds nothing (nothing was handed out since the reset).
                unsafe { System.dealloc(start as *mut u8, block(end - start)) };
            } else {
                let n = a.retired_len.get();
                if n == RETIRED {
                    trap();
                }
                a.retired[n].set((start, end));
                a.retired_len.set(n + 1);
            }
        }
        a.start.set(fresh);
        a.end.set(fresh + size);
        let at = fresh.next_multiple_of(align);
        a.next.set(at + len);
        at as *mut u8
    }

    /// Called by the export glue when a hook returns and its arguments are
    /// dropped: the arena's blocks are free again. A block much larger than a
    /// chunk's arguments (after a `plan` over a large selection) goes back to
    /// the heap, where the policy's own allocations can use it.
    pub fn reset() {
        let a = &ARENA.0;
        let (start, end) = (a.start.get(), a.end.get());
        if end - start > KEEP {
            // SAFETY: the block came from `System.alloc` with this layout, and
            // nothing lifted from it is left (the hook returned).
            unsafe { System.dealloc(start as *mut u8, block(end - start)) };
            a.start.set(0);
            a.end.set(0);
        }
        a.next.set(a.start.get());
        for r in &a.retired[..a.retired_len.get()] {
            let (s, e) = r.get();
            // SAFETY: retired blocks came from `System.alloc` with this layout.
            unsafe { System.dealloc(s as *mut u8, block(e - s)) };
        }
        a.retired_len.set(0);
    }

    /// The system allocator, except that arena pointers are never freed.
    struct ArenaAware;

    // SAFETY: defers to `System`; arena sub-blocks are disjoint and live until
    // `reset`, which runs only when no value lifted from them is left.
    unsafe impl GlobalAlloc for ArenaAware {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if !owns(ptr) {
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if !owns(ptr) {
                return unsafe { System.realloc(ptr, layout, new_size) };
            }
            // SAFETY: `new_size` is non-zero and fits `layout.align()` (the
            // caller's contract); the copy stays inside both blocks.
            unsafe {
                let new = System.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                }
                new
            }
        }
    }

    #[global_allocator]
    static ALLOCATOR: ArenaAware = ArenaAware;

    /// The canonical ABI's allocation entry point: wit-bindgen's behaviour,
    /// plus arena requests from the runner.
    ///
    /// # Safety
    /// Called by the component runtime only, per the canonical ABI.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn cabi_realloc(
        old_ptr: *mut u8,
        old_len: usize,
        align: usize,
        new_len: usize,
    ) -> *mut u8 {
        if old_ptr.is_null() && old_len == ARENA_REQUEST {
            return take(align, new_len);
        }
        let ptr = unsafe {
            if old_len == 0 {
                if new_len == 0 {
                    return align as *mut u8;
                }
                std::alloc::alloc(Layout::from_size_align_unchecked(new_len, align))
            } else {
                std::alloc::realloc(
                    old_ptr,
                    Layout::from_size_align_unchecked(old_len, align),
                    new_len,
                )
            }
        };
        if ptr.is_null() {
            trap();
        }
        ptr
    }
}
