//! `settle_threads` in a process of its own (this test binary holds one test, so no other test
//! reads the environment while it is set).

#[test]
fn settle_threads_makes_the_caller_a_worker_and_fixes_candles_count() {
    let had = std::env::var("RAYON_NUM_THREADS").ok();
    llm::threads::settle_threads();
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(
        rayon::current_thread_index(),
        Some(0),
        "the caller is worker 0"
    );
    assert_eq!(rayon::current_num_threads(), logical);
    let set: usize = std::env::var("RAYON_NUM_THREADS")
        .expect("RAYON_NUM_THREADS is set")
        .parse()
        .expect("a number");
    // Kept when given; otherwise candle's own default, which candle now reads back.
    match had {
        Some(v) => assert_eq!(set.to_string(), v),
        None => assert!(set >= 1),
    }
    assert_eq!(candle_core::utils::get_num_threads(), set);
    // Parallel work started here runs on the pool, this thread taking part.
    let (a, b) = rayon::join(rayon::current_thread_index, || 7);
    assert_eq!((a, b), (Some(0), 7));
}
