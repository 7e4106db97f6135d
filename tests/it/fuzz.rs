//! The bounded fuzz run of every `cargo test`: the cargo-fuzz targets of
//! `fuzz/` (defined in `tapledger_tests::fuzz_targets`) on a few thousand
//! generated inputs each, with allocations counted per input.
//!
//! `protocol/src/frame_tests.rs` already checks single frames (arbitrary
//! bytes, arbitrary bodies, a few flipped bytes, round trips). This adds what
//! the fuzz targets check on top: whole streams of frames decoded as the node
//! and the client do (skipping bad frames), the same stream delivered in two
//! pieces giving the same result, re-encoding every decoded message,
//! structured mutations (inserted, deleted and spliced MessagePack fragments,
//! lying length prefixes), and an allocation bound.
//!
//! More cases: `TAPLEDGER_FUZZ_CASES=100000 cargo test -p tapledger-tests fuzz`.
//! Coverage-guided runs: see `fuzz/README.md`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tapledger_protocol::FRAME_BYTES_MAX;
use tapledger_tests::fuzz_targets::{
    DICTIONARY, client_frames, mutate, mutated_frames, node_frames, seed_inputs, split,
};

/// Cases per target unless `TAPLEDGER_FUZZ_CASES` says otherwise.
const FUZZ_CASES_DEFAULT: u32 = 3_000;

// ---------------------------------------------------------------------------
// Allocation accounting: a global allocator that, on threads that asked for
// it, adds up the bytes requested and remembers the largest request.

struct CountingAllocator;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn count(size: usize) {
    let _ = COUNTING.try_with(|counting| {
        if counting.get() {
            let _ = ALLOCATED.try_with(|total| total.set(total.get().saturating_add(size)));
            let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
        }
    });
}

// SAFETY: every call is passed straight to the system allocator; counting
// touches only const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Bytes allocated in total, and the largest single allocation, while `run`
/// ran on this thread.
fn allocations(run: impl FnOnce()) -> (usize, usize) {
    ALLOCATED.with(|total| total.set(0));
    LARGEST.with(|largest| largest.set(0));
    COUNTING.with(|counting| counting.set(true));
    run();
    COUNTING.with(|counting| counting.set(false));
    (ALLOCATED.with(Cell::get), LARGEST.with(Cell::get))
}

/// Largest single allocation decoding may make, whatever the input: serde
/// pre-allocates a declared collection up to 1 MiB (`size_hint::cautious`),
/// and `protocol::scan` keeps declared counts at most the bytes present, so
/// the worst is a history page of ~16,000 declared entries. Anything above
/// means a length from the wire reached an allocation unchecked.
const SINGLE_ALLOCATION_BYTES_MAX: usize = 1024 * 1024 + 64 * 1024;
/// Total bytes one target may allocate per input byte (decoding, re-encoding
/// and decoding again, twice over for the two deliveries), plus a constant.
const ALLOCATED_PER_INPUT_BYTE_MAX: usize = 256;
const ALLOCATED_BASE_BYTES: usize = 4 * 1024 * 1024;

fn cases() -> u32 {
    std::env::var("TAPLEDGER_FUZZ_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(FUZZ_CASES_DEFAULT)
}

/// Runs `target` on `cases` inputs from `strategy` (plus the seed corpus),
/// checking the allocation bounds; returns the largest figures seen.
fn run_target(
    name: &str,
    strategy: impl Strategy<Value = Vec<u8>>,
    target: fn(&[u8]),
) -> (usize, usize) {
    let worst = Cell::new((0usize, 0usize));
    let check = |input: &[u8]| {
        let (total, largest) = allocations(|| target(input));
        assert!(
            largest <= SINGLE_ALLOCATION_BYTES_MAX,
            "{name}: one allocation of {largest} bytes for {} input bytes: {input:02x?}",
            input.len()
        );
        assert!(
            total <= ALLOCATED_BASE_BYTES + ALLOCATED_PER_INPUT_BYTE_MAX * input.len(),
            "{name}: {total} bytes allocated for {} input bytes: {input:02x?}",
            input.len()
        );
        let (total_max, largest_max) = worst.get();
        worst.set((total_max.max(total), largest_max.max(largest)));
    };
    for seed in seed_inputs() {
        check(&seed);
    }
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |input| {
        check(&input);
        Ok(())
    });
    if let Err(error) = result {
        panic!("{name}: {error}");
    }
    let (total_max, largest_max) = worst.get();
    println!(
        "fuzz {name}: {} cases, at most {total_max} bytes allocated per input, largest \
         allocation {largest_max}",
        cases()
    );
    (total_max, largest_max)
}

/// Arbitrary bytes, mostly short, now and then up to two frames' worth.
fn arbitrary_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..64),
        2 => proptest::collection::vec(any::<u8>(), 0..1024),
        1 => proptest::collection::vec(any::<u8>(), 0..2 * FRAME_BYTES_MAX + 16),
    ]
}

/// Streams of frames with plausible prefixes: random bodies, example frames
/// and dictionary fragments, each behind its true length (or a lie).
fn frame_streams() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(|body| framed(&body)),
        3 => any::<proptest::sample::Index>().prop_map(|index| {
            let seeds = seed_inputs();
            seeds[index.index(seeds.len())].clone()
        }),
        2 => proptest::collection::vec(
            any::<proptest::sample::Index>().prop_map(|index| DICTIONARY[index.index(DICTIONARY.len())].to_vec()),
            1..6
        ).prop_map(|fragments| framed(&fragments.concat())),
        1 => (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..32)).prop_map(|(declared, body)| {
            let mut frame = declared.to_be_bytes().to_vec();
            frame.extend(body);
            frame
        }),
    ];
    proptest::collection::vec(piece, 1..5).prop_map(|pieces| pieces.concat())
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

#[test]
fn fuzz_client_frames_in_cargo_test() {
    run_target(
        "client_frames (arbitrary bytes)",
        arbitrary_bytes(),
        client_frames,
    );
    run_target(
        "client_frames (frame streams)",
        frame_streams(),
        client_frames,
    );
}

#[test]
fn fuzz_node_frames_in_cargo_test() {
    run_target(
        "node_frames (arbitrary bytes)",
        arbitrary_bytes(),
        node_frames,
    );
    run_target("node_frames (frame streams)", frame_streams(), node_frames);
}

#[test]
fn fuzz_split_frame_in_cargo_test() {
    run_target("split_frame", arbitrary_bytes(), split);
}

#[test]
fn fuzz_mutated_frames_in_cargo_test() {
    let instructions = proptest::collection::vec(any::<u8>(), 1..120);
    run_target("mutated_frames", instructions, mutated_frames);
}

#[test]
fn mutations_reach_every_kind_of_answer() {
    // Goal: the structured mutator is worth its name: over a few thousand
    // instruction strings its frames produce valid client messages, valid
    // node messages, and every client-caused decode error (1000 malformed,
    // 1001 too large, 1002 unknown type, 1003 invalid field).
    use proptest::strategy::ValueTree;
    use std::collections::BTreeSet;
    use tapledger_protocol::{ClientMessage, NodeMessage, decode_frame};
    let mut seen = BTreeSet::new();
    let mut runner = TestRunner::deterministic();
    for _ in 0..4_000 {
        let instructions = proptest::collection::vec(any::<u8>(), 1..40)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let frame = mutate(&instructions);
        match decode_frame::<ClientMessage>(&frame) {
            Ok(Some(_)) => seen.insert("client message".to_string()),
            Ok(None) => seen.insert("incomplete".to_string()),
            Err(error) => seen.insert(error.code().code().to_string()),
        };
        if let Ok(Some(_)) = decode_frame::<NodeMessage>(&frame) {
            seen.insert("node message".to_string());
        }
    }
    for expected in [
        "client message",
        "node message",
        "1000",
        "1001",
        "1002",
        "1003",
    ] {
        assert!(
            seen.contains(expected),
            "never produced {expected}: {seen:?}"
        );
    }
}

#[test]
fn allocation_counting_sees_the_largest_preallocation_decoding_allows() {
    // Goal: the allocation bound above is real: the counter sees serde's
    // pre-allocation for a declared collection, and the worst case the codec
    // admits stays under the bound. The worst is a node's `history_answer`
    // whose `entries` array declares as many elements as the 16 KiB body has
    // bytes (each a one-byte nil): serde reserves room for them all (capped at
    // 1 MiB) before it finds the first one is no entry. A client reading a
    // node's answers pays that; the node reading clients' requests never
    // does (their only sequences are byte strings, at most the frame).
    use tapledger_protocol::{NodeMessage, decode_frame};
    let mut body = vec![0x83];
    body.push(0xa4);
    body.extend_from_slice(b"type");
    body.push(0xae);
    body.extend_from_slice(b"history_answer");
    body.extend_from_slice(&[0xaa]);
    body.extend_from_slice(b"request_id");
    body.push(0x01);
    body.extend_from_slice(&[0xa7]);
    body.extend_from_slice(b"entries");
    let declared = FRAME_BYTES_MAX - body.len() - 3;
    body.push(0xdc);
    body.extend_from_slice(&(declared as u16).to_be_bytes());
    body.resize(FRAME_BYTES_MAX, 0xc0);
    let frame = framed(&body);
    let (_, largest) = allocations(|| {
        let decoded = decode_frame::<NodeMessage>(&frame);
        assert!(decoded.is_err(), "{decoded:?}");
    });
    println!(
        "a {}-byte history_answer declaring {declared} entries made a {largest}-byte allocation",
        frame.len()
    );
    assert!(
        largest > 64 * 1024,
        "the counter missed serde's pre-allocation: {largest}"
    );
    assert!(largest <= SINGLE_ALLOCATION_BYTES_MAX, "{largest}");
}
