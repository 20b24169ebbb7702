//! A global allocator that counts: every allocation (and reallocation, which may move a block)
//! made through it is counted in atomics before being handed to [`std::alloc::System`].
//! Install it in a binary with
//! `#[global_allocator] static A: alloc_counter::Counting = alloc_counter::Counting;` and read
//! [`snapshot`] before and after the work to measure.
//!
//! Counts are kept per *group* of threads: a thread is in group 0 until it calls
//! [`join_group`] (e.g. from a tokio runtime's `on_thread_start`), so that the work of one
//! runtime can be told from another's in the same process ([`group_snapshot`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// How many groups of threads are counted apart.
pub const GROUPS: usize = 4;

static ALLOCATIONS: [AtomicU64; GROUPS] = [const { AtomicU64::new(0) }; GROUPS];
static BYTES: [AtomicU64; GROUPS] = [const { AtomicU64::new(0) }; GROUPS];

thread_local! {
    // Const-initialised and without a destructor: reading it never allocates, so the
    // allocator may.
    static GROUP: Cell<usize> = const { Cell::new(0) };
}

/// The counting allocator; see the crate's doc.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counting;

/// What was allocated since the process started (frees are not subtracted: the counts
/// measure work done, not memory held).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// `alloc`, `alloc_zeroed` and `realloc` calls.
    pub allocations: u64,
    /// Bytes they asked for (a `realloc` counts its new size).
    pub bytes: u64,
}

impl Snapshot {
    /// What was allocated between `earlier` and `self`.
    pub fn since(self, earlier: Snapshot) -> Snapshot {
        Snapshot {
            allocations: self.allocations.wrapping_sub(earlier.allocations),
            bytes: self.bytes.wrapping_sub(earlier.bytes),
        }
    }
}

/// Counts the calling thread's allocations from now on in `group` (below [`GROUPS`]; a
/// larger number counts in the last group).
pub fn join_group(group: usize) {
    GROUP.with(|g| g.set(group.min(GROUPS - 1)));
}

/// What the threads of `group` allocated so far. Relaxed loads: the reader synchronises with
/// the threads it measures some other way (their work is awaited before the second snapshot).
pub fn group_snapshot(group: usize) -> Snapshot {
    let g = group.min(GROUPS - 1);
    Snapshot {
        allocations: ALLOCATIONS[g].load(Ordering::Relaxed),
        bytes: BYTES[g].load(Ordering::Relaxed),
    }
}

/// What the whole process allocated so far (every group).
pub fn snapshot() -> Snapshot {
    (0..GROUPS)
        .map(group_snapshot)
        .fold(Snapshot::default(), |a, s| Snapshot {
            allocations: a.allocations + s.allocations,
            bytes: a.bytes + s.bytes,
        })
}

fn count(size: usize) {
    // A thread being torn down has no group left: it counts in group 0.
    let g = GROUP.try_with(Cell::get).unwrap_or(0);
    ALLOCATIONS[g].fetch_add(1, Ordering::Relaxed);
    BYTES[g].fetch_add(size as u64, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees are ours; counting touches only atomics and a const thread-local, and
// never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s contract on `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
