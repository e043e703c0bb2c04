//! The server's global allocator: mimalloc, asked for a plain block wherever the
//! alignment Rust asks for is one every mimalloc block already has.
//!
//! Rust hands an allocator a size and an alignment for every allocation, and the
//! `mimalloc` crate's `MiMalloc` passes both to `mi_malloc_aligned`. In mimalloc 3 that
//! takes a fast path only when the size class's free list happens to be non-empty and
//! its first block aligned; otherwise it over-allocates by the alignment and rounds up
//! the address, even for an alignment of 8 that every block has anyway. A server that
//! allocates and frees the same few blocks per request (a body channel, a boxed handler
//! future, an answer) empties those free lists every time, so most of its allocations
//! took the slow path: about 480 of the 21,700 instructions of a `POST /v1/check`
//! (BENCHMARKS.md, "Plain blocks from mimalloc"). mimalloc's author advises calling
//! `mi_malloc` directly when the alignment is at most `MI_MAX_ALIGN_SIZE` and at most
//! the size (microsoft/mimalloc#314); that is what [`Mimalloc`] does, and it keeps the
//! aligned calls for everything else.

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment of every block mimalloc returns for a size at least this large
/// (`MI_MAX_ALIGN_SIZE` on the platforms Rust supports it on).
const ALIGNED_ANYWAY: usize = 16;

/// mimalloc as the global allocator (see the crate docs).
///
/// ```
/// #[global_allocator]
/// static ALLOCATOR: sluice_alloc::Mimalloc = sluice_alloc::Mimalloc;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Mimalloc;

/// Whether a plain block of `size` bytes is aligned to `align` whatever mimalloc picks:
/// blocks under 16 bytes are only 8-aligned, so the size must reach the alignment.
#[inline]
fn plain_block_fits(size: usize, align: usize) -> bool {
    align <= ALIGNED_ANYWAY && align <= size
}

// SAFETY: every call passes mimalloc a size and alignment from a valid `Layout` (a
// power-of-two alignment, a size that does not overflow when rounded up to it), and
// every pointer handed back to `mi_free`/`mi_realloc*` came from this allocator.
// `mi_free` and the `mi_realloc*` functions accept blocks from both the plain and the
// aligned entry points, so which one allocated a block does not matter when it is
// freed or moved.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if plain_block_fits(layout.size(), layout.align()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if plain_block_fits(layout.size(), layout.align()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: see the impl.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl. The new block must have the old alignment at the new size.
        unsafe {
            if plain_block_fits(new_size, layout.align()) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of every size and alignment up to a page come back aligned, keep their
    /// bytes when grown and shrunk (shrunk below their alignment too), and zeroed ones
    /// are zero.
    #[test]
    fn every_block_has_its_alignment_and_keeps_its_bytes() {
        let allocator = Mimalloc;
        let pattern = |i: usize| (i % 251) as u8;
        for align in [1usize, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1usize, 3, 8, 15, 16, 17, 24, 100, 1000, 1500, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).expect("valid");
                let grown = Layout::from_size_align(size * 3, align).expect("valid");
                let shrunk = Layout::from_size_align((size / 2).max(1), align).expect("valid");
                // SAFETY: non-zero sizes; each block is used within its size and freed
                // once, with the layout it has then.
                unsafe {
                    let zeroed = allocator.alloc_zeroed(layout);
                    assert!(!zeroed.is_null());
                    assert_eq!(zeroed as usize % align, 0, "zeroed {size} at {align}");
                    assert!((0..size).all(|i| *zeroed.add(i) == 0));
                    allocator.dealloc(zeroed, layout);

                    let block = allocator.alloc(layout);
                    assert!(!block.is_null());
                    assert_eq!(block as usize % align, 0, "{size} at {align}");
                    for i in 0..size {
                        *block.add(i) = pattern(i);
                    }
                    let block = allocator.realloc(block, layout, grown.size());
                    assert!(!block.is_null());
                    assert_eq!(block as usize % align, 0, "{size} grown at {align}");
                    assert!((0..size).all(|i| *block.add(i) == pattern(i)));
                    let block = allocator.realloc(block, grown, shrunk.size());
                    assert!(!block.is_null());
                    assert_eq!(block as usize % align, 0, "{size} shrunk at {align}");
                    assert!((0..shrunk.size()).all(|i| *block.add(i) == pattern(i)));
                    allocator.dealloc(block, shrunk);
                }
            }
        }
    }

    /// The plain entry points are used exactly where a plain block is aligned enough.
    #[test]
    fn plain_blocks_only_where_they_are_aligned_enough() {
        assert!(plain_block_fits(8, 8));
        assert!(plain_block_fits(1496, 8));
        assert!(plain_block_fits(16, 16));
        assert!(
            !plain_block_fits(8, 16),
            "an 8-byte block is only 8-aligned"
        );
        assert!(!plain_block_fits(4096, 32));
        assert!(!plain_block_fits(3968, 128));
    }
}
