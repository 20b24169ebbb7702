//! Gives the allocator's free memory back to the system.
//!
//! glibc's allocator returns freed memory to the system only from the top of each heap; pages
//! freed in the middle (the buffers of connections that closed or went to rest, between the
//! small allocations of those still open) stay resident. `malloc_trim(0)` releases every whole
//! free page. It takes the allocator's locks while it walks the heaps, so it is called from a
//! blocking thread, and rarely.

/// Releases the allocator's free pages to the system; whether any memory was released. Does
/// nothing (and returns `false`) where the C library is not glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_memory() -> bool {
    extern "C" {
        fn malloc_trim(pad: usize) -> i32;
    }
    // SAFETY: `malloc_trim` has no preconditions: it only walks the allocator's own heaps,
    // under the allocator's own locks, and may be called from any thread at any time.
    unsafe { malloc_trim(0) != 0 }
}

/// Releases the allocator's free pages to the system; whether any memory was released. Does
/// nothing (and returns `false`) where the C library is not glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn freed_memory_is_released() {
        // A heap with free pages in it: many blocks allocated, every other one freed, so the
        // free space is in the middle of the heap, where only a trim can release it.
        let mut blocks: Vec<Vec<u8>> = (0..4096).map(|_| vec![1u8; 16 * 1024]).collect();
        for i in (0..blocks.len()).step_by(2) {
            blocks[i] = Vec::new();
        }
        let released = super::release_free_memory();
        assert_eq!(
            released,
            cfg!(all(target_os = "linux", target_env = "gnu")),
            "free whole pages in the middle of the heap are released on glibc"
        );
        assert_eq!(blocks[1][0], 1, "live memory is untouched");
    }
}
