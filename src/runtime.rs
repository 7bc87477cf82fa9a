//! Process-wide threading and allocator setup.
//!
//! candle's CPU backend runs element-wise ops on its own spinning thread pool, beside rayon
//! (which our kernels and the matmuls use). On few cores the two pools spin against each
//! other and training runs at half speed or worse, so candle's pool is reduced to the
//! calling thread unless the user chose otherwise; the heavy ops parallelise through rayon.

use std::sync::Once;

static INIT: Once = Once::new();

/// Sets `CANDLE_NUM_THREADS=1` when unset, and keeps freed activation buffers in the
/// process (see [`keep_freed_memory`]). Must run before candle's first element-wise op (its
/// pool is sized once); `io::load_model` and the binary call it.
pub fn init() {
    INIT.call_once(|| {
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        keep_freed_memory();
    });
}

/// A training step allocates and frees the same activation-sized buffers over and over.
/// glibc serves blocks above its mmap threshold with fresh mappings and unmaps them on free,
/// so every step faults and zeroes those pages again (a quarter of an encoder step's CPU time
/// in the kernel). Raising the mmap threshold to its maximum (32 MiB on 64-bit) and the trim
/// threshold keeps freed buffers in the heap for reuse; peak RSS is unchanged since the same
/// sizes recur. An explicit `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` in the
/// environment wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only adjusts allocator parameters; called once, before the heavy work.
    unsafe {
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        }
        if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
