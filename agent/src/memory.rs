//! Keeping the memory the allocator holds close to the memory in use (glibc's malloc).
//!
//! A scrape handles buffers of tens of megabytes (the body, the remote-write records) for a
//! moment every interval. glibc raises its mmap threshold to the size of the largest block
//! freed, after which such buffers come from the heap and their pages stay with the process
//! between scrapes. A fixed threshold keeps large buffers mmapped, so they go back to the
//! system when freed; [`release`] hands back what a rare large burst (a target's first scrape)
//! left free in the heap.

/// Blocks at least this large are mapped on their own and unmapped when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 * 1024;

/// Sets the allocator up; call once, before other threads start.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; no thread allocates concurrently yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Returns free heap memory to the system, after a burst of allocations.
pub fn release() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases memory no allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}
