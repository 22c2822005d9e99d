//! What the CPU benches share.

use std::time::{Duration, Instant};

/// Best of `tries` timings of `f`.
pub fn best(tries: usize, mut f: impl FnMut()) -> Duration {
    (0..tries)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .expect("at least one try")
}
