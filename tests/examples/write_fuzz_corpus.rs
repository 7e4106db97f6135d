//! Writes the seed corpus for cargo-fuzz into `fuzz/corpus/<target>/` from the
//! protocol's example frames. Run it after changing the examples:
//! `cargo run -p tapledger-tests --example write_fuzz_corpus`.

use tapledger_tests::fuzz_targets::seed_inputs;

fn main() -> std::io::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for target in [
        "client_frames",
        "node_frames",
        "split_frame",
        "mutated_frames",
    ] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (index, seed) in seed_inputs().into_iter().enumerate() {
            // mutated_frames reads instructions: pick example `index`, no mutation.
            let seed = if target == "mutated_frames" {
                vec![index as u8]
            } else {
                seed
            };
            std::fs::write(dir.join(format!("seed-{index:02}")), seed)?;
        }
        println!("wrote {}", dir.display());
    }
    Ok(())
}
