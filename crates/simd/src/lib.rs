//! Run-time choice of instruction set for the hot loops, shared by the codec (`rvq`), the
//! caches (`kvcache`) and the weight kernels (`quant`).
//!
//! The workspace builds for baseline x86-64 (SSE2), so that one binary runs anywhere. Hot loops
//! are written once, as plain Rust that vectorizes well, and compiled three times by
//! [`multiversion!`]: for AVX-512, for AVX2 + FMA, and portable. The
//! version is chosen once per process from what the CPU reports, or from the `RVQ_KV_SIMD`
//! environment variable (`avx512`, `avx2`, `portable`), or by [`force`] — which is how the tests
//! run the portable build on a machine that has AVX-512.

pub mod matmul;
pub mod vector;

use std::sync::atomic::{AtomicU8, Ordering};

/// Instruction-set level of the compiled loop versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Portable = 1,
    /// AVX2, FMA and F16C.
    Avx2 = 2,
    /// AVX-512 F/BW/VL (plus everything of `Avx2`).
    Avx512 = 3,
}

/// 0: not decided yet.
static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The level every multiversioned loop runs at.
#[inline]
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Portable,
        2 => Level::Avx2,
        3 => Level::Avx512,
        _ => {
            let l = configured();
            LEVEL.store(l as u8, Ordering::Relaxed);
            l
        }
    }
}

/// The level this process was configured with: `RVQ_KV_SIMD`, capped by the CPU — what
/// [`level`] returns unless a test [`force`]s another.
pub fn configured() -> Level {
    requested().unwrap_or_else(detected).min(detected())
}

/// Makes every loop run at `level` from now on (capped at what the CPU has); returns the level
/// in effect. For tests and benchmarks that compare versions.
pub fn force(level: Level) -> Level {
    let l = level.min(detected());
    LEVEL.store(l as u8, Ordering::Relaxed);
    l
}

/// Runs `f` once at each level this CPU supports (portable first) and returns the results, for
/// tests that check every compiled version gives the same answer. Calls are serialised; other
/// threads see the forced level meanwhile (harmless: every level computes the same thing).
pub fn at_each_level<R>(mut f: impl FnMut(Level) -> R) -> Vec<(Level, R)> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = level();
    let results = [Level::Portable, Level::Avx2, Level::Avx512]
        .into_iter()
        .filter(|&l| l <= detected())
        .map(|l| {
            force(l);
            (l, f(l))
        })
        .collect();
    force(before);
    results
}

/// The best level this CPU supports.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma") && has!("f16c");
        if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Portable
}

/// `RVQ_KV_SIMD`, when set to a known level.
fn requested() -> Option<Level> {
    match std::env::var("RVQ_KV_SIMD")
        .ok()?
        .to_ascii_lowercase()
        .as_str()
    {
        "avx512" => Some(Level::Avx512),
        "avx2" => Some(Level::Avx2),
        "portable" | "none" => Some(Level::Portable),
        _ => None,
    }
}

/// Defines `fn $name(args) -> ret` that runs `$body(args)` — an `#[inline(always)]` function of
/// plain Rust — compiled for the level of [`level()`](crate::level).
///
/// ```
/// #[inline(always)]
/// fn sum_body(xs: &[f32]) -> f32 {
///     xs.iter().sum()
/// }
///
/// simd::multiversion! {
///     /// Doc of the dispatched function.
///     pub fn sum(xs: &[f32]) -> f32 = sum_body;
/// }
///
/// assert_eq!(sum(&[1.0, 2.0, 3.5]), 6.5);
/// ```
#[macro_export]
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:path;) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                #[target_feature(enable = "avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                match $crate::level() {
                    // SAFETY: `level()` never exceeds what the CPU reports.
                    $crate::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::Level::Portable => {}
                }
            }
            $body($($arg),*)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_level_runs_and_forcing_is_capped() {
        let seen = at_each_level(|_| level());
        assert_eq!(seen[0], (Level::Portable, Level::Portable));
        assert!(seen.iter().all(|(l, got)| l == got));
        assert_eq!(seen.last().unwrap().0, detected());
    }
}
