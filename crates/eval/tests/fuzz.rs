//! Structure-aware fuzzing of the parsers that read untrusted bytes: the GGUF reader (a whole
//! model load), the codebook loader and the packed-code unpacker. Files are valid ones with a few
//! bytes overwritten (often with extreme integers) or cut short; the property is an error or a
//! valid result, never a panic, and no single allocation larger than a bounded multiple of the
//! file's size (a size field must be refused before it becomes an allocation).
//!
//! `cargo test` runs a bounded number of cases; the long mode runs each fuzzer for
//! `RVQ_KV_FUZZ_SECONDS` (default 600) and prints the cases it ran:
//! `cargo test --release -p eval --test fuzz -- --ignored --nocapture`.

mod common;

use kvcache::codebooks::Codebooks;
use kvcache::testkit::codebooks_for;
use kvcache::ModelIdentity;
use proptest::prelude::*;
use rvq::rng::SplitMix64;
use rvq::testkit::random_rvq;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The system allocator, noting the largest single request made on a thread that is watching.
struct Watched;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = WATCHING.try_with(|on| {
        if on.get() {
            LARGEST.with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`; `note` only reads and writes
// thread-local cells, which never allocate.
unsafe impl GlobalAlloc for Watched {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Watched = Watched;

/// The largest single allocation `f` asks for on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    WATCHING.with(|on| on.set(true));
    let out = f();
    WATCHING.with(|on| on.set(false));
    (out, LARGEST.with(|l| l.get()))
}

/// A valid file and the part of it worth mutating most (headers and metadata).
struct Seed {
    bytes: Vec<u8>,
    header: usize,
    dir: tempfile::TempDir,
}

/// The tiny llama from `rvq-kv synth`: 2 layers, SmolLM2's tokenizer.
fn gguf_seed() -> &'static Seed {
    static SEED: OnceLock<Seed> = OnceLock::new();
    SEED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let tokenizer = eval::assets::ensure_model(&common::home()).unwrap();
        let preset = llm::synth::Preset::by_name(llm::synth::Arch::Llama, "tiny").unwrap();
        llm::synth::write(&preset, "q8_0", &tokenizer, &path, 0, |_, _| {}).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        Seed {
            header: content.tensor_data_offset as usize,
            bytes,
            dir,
        }
    })
}

/// Random codebooks of two layers (no model needed to load them).
fn codebook_seed() -> &'static Seed {
    static SEED: OnceLock<Seed> = OnceLock::new();
    SEED.get_or_init(|| {
        let mut rng = SplitMix64::new(7);
        let model = ModelIdentity {
            architecture: "llama".into(),
            layers: 2,
            kv_heads: 1,
            head_dim: 32,
            file_sha256: "ab".repeat(32),
        };
        let books = codebooks_for(model, 16, || random_rvq(&mut rng, 16, 8, 2));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("books.safetensors");
        books.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        Seed { bytes, header, dir }
    })
}

/// Integers that break naive size arithmetic.
const EXTREMES: [u64; 8] = [
    0,
    1,
    255,
    0xFFFF_FFFF,
    1 << 31,
    1 << 62,
    u64::MAX,
    u64::MAX - 7,
];

/// One to four changes to `seed`: overwrite a byte, write an extreme or random integer (u32 or
/// u64, little-endian), or cut the file short; positions fall in the header nine times in ten.
fn mutate(seed: &Seed, rng: &mut SplitMix64) -> Vec<u8> {
    let mut b = seed.bytes.clone();
    let changes = 1 + rng.below(4);
    for _ in 0..changes {
        let len = b.len();
        if len < 16 {
            break;
        }
        let at = if rng.below(10) < 9 {
            rng.below(seed.header.min(len))
        } else {
            rng.below(len)
        };
        match rng.below(4) {
            0 => b[at] = rng.below(256) as u8,
            1 | 2 => {
                let value = if rng.below(2) == 0 {
                    EXTREMES[rng.below(EXTREMES.len())]
                } else {
                    rng.next_u64()
                };
                let width = if rng.below(2) == 0 { 4 } else { 8 };
                let end = (at + width).min(len);
                b[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
            }
            _ => b.truncate(at.max(1)),
        }
    }
    b
}

/// What a loader may ask for in one piece per byte of its file. The most is candle's GGUF
/// metadata reader: it holds each array element as a 32-byte value in a `Vec` that grows by
/// doubling, so an array of one-byte elements costs up to 64 bytes per byte of file. Anything
/// larger came from a size field nobody checked (a dimension of 2^62, a count of 2^32).
const ALLOCATION_PER_FILE_BYTE: usize = 64;

/// Buffers every load holds whatever the file's size (readers, the tokenizer's tables).
const ALLOCATION_FLOOR: usize = 8 << 20;

/// Writes `bytes` to a file in the seed's folder and runs `load` on it: Ok or an error, never a
/// panic, and no single allocation over `ALLOCATION_PER_FILE_BYTE` times the file's size (plus
/// `ALLOCATION_FLOOR`).
/// Returns whether it loaded.
fn survives(seed: &Seed, bytes: &[u8], load: impl Fn(&Path) -> bool) -> Result<bool, String> {
    // A file of its own: tests run on several threads at once.
    let file = tempfile::NamedTempFile::new_in(seed.dir.path()).unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    let path = file.path();
    let (outcome, largest) = largest_allocation(|| catch_unwind(AssertUnwindSafe(|| load(path))));
    let loaded = outcome.map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })?;
    let bound = ALLOCATION_FLOOR + ALLOCATION_PER_FILE_BYTE * bytes.len();
    if largest > bound {
        return Err(format!(
            "one allocation of {largest} bytes for a file of {} bytes",
            bytes.len()
        ));
    }
    Ok(loaded)
}

fn load_model(path: &Path) -> bool {
    let model = match llm::Model::load(path) {
        Ok(m) => m,
        Err(e) => {
            if std::env::var_os("FUZZ_DEBUG").is_some() {
                eprintln!("{e:#}");
            }
            return false;
        }
    };
    // A model that loads must also run.
    let mut cache = model.new_cache("f16").unwrap();
    let _ = model.forward(&[1, 2, 3], 0, cache.as_mut(), Some(1));
    true
}

fn load_codebooks(path: &Path) -> bool {
    Codebooks::load(path).is_ok()
}

/// The reference unpacking: bit by bit.
fn unpack_slowly(bytes: &[u8], bits: u32, n: usize) -> Vec<u16> {
    (0..n)
        .map(|i| {
            (0..bits as usize).fold(0u16, |code, b| {
                let bit = i * bits as usize + b;
                code | ((((bytes[bit / 8] >> (bit % 8)) & 1) as u16) << b)
            })
        })
        .collect()
}

/// Every unpacker, at every SIMD level, against the reference, on arbitrary bytes.
fn unpackers_agree(bytes: &[u8], bits: u32) -> Result<(), String> {
    let n = bytes.len() * 8 / bits as usize;
    let expected = unpack_slowly(bytes, bits, n);
    let mut row = vec![0u16; n];
    rvq::pack::unpack_row(bytes, bits, &mut row);
    if row != expected {
        return Err(format!("unpack_row differs at {bits} bits"));
    }
    for (level, stream) in simd::at_each_level(|_| {
        let mut out = vec![0u16; n];
        rvq::pack::unpack_stream(bytes, bits, &mut out);
        out
    }) {
        if stream != expected {
            return Err(format!("unpack_stream differs at {bits} bits, {level:?}"));
        }
    }
    Ok(())
}

#[test]
fn the_valid_seeds_load_within_the_allocation_bound() {
    let s = gguf_seed();
    assert_eq!(survives(s, &s.bytes, load_model), Ok(true));
    let s = codebook_seed();
    assert_eq!(survives(s, &s.bytes, load_codebooks), Ok(true));
    // The watch sees what it must refuse.
    let (_, largest) = largest_allocation(|| std::hint::black_box(vec![1u8; 3 << 20]));
    assert!(largest >= 3 << 20, "{largest}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_mutated_gguf_loads_or_fails_cleanly(seed in any::<u64>()) {
        let s = gguf_seed();
        let bytes = mutate(s, &mut SplitMix64::new(seed));
        let outcome = survives(s, &bytes, load_model);
        prop_assert!(outcome.is_ok(), "seed {seed}: {outcome:?}");
    }

    #[test]
    fn a_mutated_codebook_file_loads_or_fails_cleanly(seed in any::<u64>()) {
        let s = codebook_seed();
        let bytes = mutate(s, &mut SplitMix64::new(seed));
        let outcome = survives(s, &bytes, load_codebooks);
        prop_assert!(outcome.is_ok(), "seed {seed}: {outcome:?}");
    }

    #[test]
    fn unpacking_arbitrary_bytes_matches_the_bit_by_bit_reference(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        bits in 1u32..=16,
    ) {
        prop_assert_eq!(unpackers_agree(&bytes, bits), Ok(()));
    }
}

/// Runs `case` on fresh seeds for `RVQ_KV_FUZZ_SECONDS`; prints how many ran and how many of
/// them gave a valid result (the rest were refused with an error).
fn fuzz_for_a_while(name: &str, case: impl Fn(u64) -> Result<bool, String>) {
    let seconds: u64 = std::env::var("RVQ_KV_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let t = Instant::now();
    let mut seeds = SplitMix64::new(t.elapsed().as_nanos() as u64 ^ 0x5EED);
    let mut runs = 0u64;
    let mut valid = 0u64;
    let mut failures = Vec::new();
    while t.elapsed() < Duration::from_secs(seconds) {
        let seed = seeds.next_u64();
        match case(seed) {
            Ok(ok) => valid += ok as u64,
            Err(e) => failures.push(format!("seed {seed}: {e}")),
        }
        runs += 1;
    }
    println!(
        "fuzz {name}: {runs} cases in {seconds} s ({valid} valid, {} refused), {} failures",
        runs - valid - failures.len() as u64,
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
#[ignore = "long mode: minutes per parser"]
fn fuzz_gguf_long() {
    let s = gguf_seed();
    fuzz_for_a_while("gguf", |seed| {
        let bytes = mutate(s, &mut SplitMix64::new(seed));
        survives(s, &bytes, load_model)
    });
}

#[test]
#[ignore = "long mode: minutes per parser"]
fn fuzz_codebooks_long() {
    let s = codebook_seed();
    fuzz_for_a_while("codebooks", |seed| {
        let bytes = mutate(s, &mut SplitMix64::new(seed));
        survives(s, &bytes, load_codebooks)
    });
}

#[test]
#[ignore = "long mode: minutes per parser"]
fn fuzz_unpacker_long() {
    fuzz_for_a_while("unpacker", |seed| {
        let mut rng = SplitMix64::new(seed);
        let bytes: Vec<u8> = (0..rng.below(300)).map(|_| rng.below(256) as u8).collect();
        unpackers_agree(&bytes, 1 + rng.below(16) as u32).map(|()| true)
    });
}
