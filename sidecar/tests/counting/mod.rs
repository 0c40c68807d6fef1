//! A global allocator that counts the bytes this test process holds on the heap, for the heap
//! test and the soak: it forwards every call to the system allocator (glibc's malloc) and only
//! observes. [`live_bytes`] is what the program holds; [`malloc_kib`] what malloc holds for it
//! besides (its free lists), which is where fragmentation shows.
// The allocator is the one unsafe item of these tests.
#![allow(unsafe_code)]
// Each test uses what it needs of it.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

/// Declare it with `#[global_allocator] static ALLOCATOR: Counting = Counting;`.
pub struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the counter only observes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

/// Bytes the program holds through the global allocator now (requested sizes, not malloc's
/// rounded chunks).
pub fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// What glibc's malloc holds, from `mallinfo2(3)` over all its arenas, in KiB.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MallocKib {
    /// Obtained from the kernel by `brk`/`mmap` for the arenas (`arena`).
    pub arenas: u64,
    /// In use by the program, rounded to malloc's chunks (`uordblks`).
    pub in_use: u64,
    /// Free inside the arenas, kept for later allocations (`fordblks`): fragmentation.
    pub free: u64,
    /// Of that, releasable at the top of the main arena (`keepcost`).
    pub top_releasable: u64,
    /// Large blocks mapped on their own (`hblkhd`).
    pub mmapped: u64,
}

/// The current [`MallocKib`].
pub fn malloc_kib() -> MallocKib {
    // SAFETY: mallinfo2 only reads malloc's statistics (it takes the arenas' locks).
    let m = unsafe { libc::mallinfo2() };
    MallocKib {
        arenas: m.arena as u64 / 1024,
        in_use: m.uordblks as u64 / 1024,
        free: m.fordblks as u64 / 1024,
        top_releasable: m.keepcost as u64 / 1024,
        mmapped: m.hblkhd as u64 / 1024,
    }
}
