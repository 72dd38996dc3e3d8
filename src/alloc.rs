//! The binary's global allocator: mimalloc, called the way its C API is
//! fastest. The `mimalloc` crate passes every allocation to
//! `mi_malloc_aligned`, whose fast path covers only blocks up to 1 KiB: a
//! larger one (a request's head buffer, pingora's boxed request future, a
//! header map's buckets) took the generic aligned path and, unless its size
//! class was a power of two, an over-allocation, whose `free` then has to
//! find the block's start (callgrind: 20 such allocations per proxied GET,
//! about 5k instructions). Plain `mi_malloc` already aligns every block to
//! 16 bytes (8 under 16 bytes), the fundamental alignment, so only a larger
//! one (tokio's cache-padded cells) goes to the aligned API. The crate has
//! no switch for this, hence these few lines over `libmimalloc-sys`.
//! `bench/floor` uses this same file.
//!
//! The 16-byte guarantee holds for mimalloc's release build, the one
//! `libmimalloc-sys` makes without its `debug` features (pinned in
//! Cargo.toml): a debug build compiles in guarded allocation, which with
//! `MIMALLOC_GUARDED_PRECISE` places plain blocks against a guard page,
//! unaligned.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment `mi_malloc` guarantees for a block of at least that many
/// bytes (mimalloc's `MI_MAX_ALIGN_SIZE`, `sizeof(max_align_t)`).
const MI_MAX_ALIGN: usize = 16;

/// mimalloc as the global allocator (see the module doc).
pub struct Mimalloc;

/// Whether plain `mi_malloc` of `size` bytes is aligned to `align`: blocks
/// under 16 bytes are aligned to 8 (a word), the others to 16.
#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= MI_MAX_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc with at least the layout's
// alignment (`plain` above, or the aligned API), and is freed by
// `mi_free`, which takes blocks of either API.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{plain, Mimalloc};
    use std::alloc::{GlobalAlloc, Layout};

    /// Every layout shape the two paths split on comes back aligned, holds
    /// its bytes, and survives growing and shrinking.
    #[test]
    fn blocks_are_aligned_and_keep_their_bytes_across_realloc() {
        let a = Mimalloc;
        // Small, medium, large (over 64 KiB) and huge (over 512 KiB)
        // blocks, powers of two and not.
        let sizes: [usize; 18] = [
            1, 7, 8, 12, 15, 16, 24, 40, 100, 1000, 1025, 4000, 10_241, 70_000, 100_000, 600_000,
            1_048_584, 3_145_728,
        ];
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in sizes {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: a non-zero layout; each block is written within
                // its size and freed once, with the layout it has.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    std::ptr::write_bytes(p, 0xA5, size);
                    let grown = a.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "grown {size} align {align}");
                    assert!((0..size).all(|i| *grown.add(i) == 0xA5));
                    let grown_layout = Layout::from_size_align(size * 3, align).unwrap();
                    let shrunk = a.realloc(grown, grown_layout, size.div_ceil(2));
                    assert_eq!(shrunk as usize % align, 0, "shrunk {size} align {align}");
                    assert!((0..size.div_ceil(2)).all(|i| *shrunk.add(i) == 0xA5));
                    let shrunk_layout = Layout::from_size_align(size.div_ceil(2), align).unwrap();
                    a.dealloc(shrunk, shrunk_layout);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }

    #[test]
    fn only_alignments_mimalloc_guarantees_take_the_plain_path() {
        assert!(plain(8, 8));
        assert!(plain(16, 16));
        assert!(plain(16, 4096));
        assert!(!plain(16, 8), "an 8-byte block is aligned to 8 only");
        assert!(!plain(32, 64));
        assert!(!plain(128, 4096));
    }
}
