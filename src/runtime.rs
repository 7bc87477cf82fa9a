//! Process-wide threading setup.
//!
//! candle's CPU backend runs element-wise ops on its own spinning thread pool, beside rayon
//! (which our kernels and the matmuls use). On few cores the two pools spin against each
//! other and training runs at half speed or worse, so candle's pool is reduced to the
//! calling thread unless the user chose otherwise; the heavy ops parallelise through rayon.

use std::sync::Once;

static INIT: Once = Once::new();

/// Sets `CANDLE_NUM_THREADS=1` when unset. Must run before candle's first element-wise op
/// (its pool is sized once); `io::load_model` and the binary call it.
pub fn init() {
    INIT.call_once(|| {
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
    });
}
