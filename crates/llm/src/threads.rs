//! The process's threads, settled once at start: candle's thread count and rayon's pool.
//!
//! candle asks for its thread count at every matrix product, and unless `RAYON_NUM_THREADS` is
//! set it counts the physical cores by reading `/proc/cpuinfo` each time: ~40 µs on a 2-core
//! VM, about 150 times per decode step of SmolLM2 (strace: 2420 reads in a 1K prefill and 16
//! decode steps) — several milliseconds per token.

/// Settles the process's threads, first thing in `main`, before any thread exists (changing the
/// environment while another thread reads it is undefined behaviour in libc):
/// - sets `RAYON_NUM_THREADS` to candle's own default (the physical cores it counts) unless it is
///   set already, so that later products read the variable instead of `/proc/cpuinfo`;
/// - builds rayon's global pool with one thread per logical CPU (rayon's default), the calling
///   thread being one of them. Parallel work started from a thread outside the pool is handed
///   over and the caller sleeps on a lock until it is done, so every parallel region of a decode
///   step (matrix products, attention, encode, in every layer) paid a thread wake-up; started
///   from a worker, the other worker steals it from a queue (measured on the 2-core VM: f16
///   attention at 1K 2.3–2.5 ms a step vs 5.0–5.4 ms, RVQ encode 2.5–3.0 vs 4.6–5.0 ms).
pub fn settle_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let matmul = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", matmul.to_string());
    }
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Fails only if the pool exists already, which then stays as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(logical)
        .use_current_thread()
        .build_global();
}
