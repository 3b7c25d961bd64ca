//! Handing freed memory back to the operating system.
//!
//! The engine's big moments (targeting 100,000 nodes, dispatching or
//! closing a wave of 50,000) allocate and free tens of MB at once. glibc
//! keeps what was freed in the middle of its heap, so without help the
//! runner's RSS would stay at the high-water mark of its biggest tick.

/// Returns the free pages of the heap to the OS (glibc's `malloc_trim`). It
/// walks the heap (a few ms at a few hundred MB), so call it after big work
/// only. A no-op where the allocator is not glibc's.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: glibc's `malloc_trim` takes a byte count, only releases free
    // memory, and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
