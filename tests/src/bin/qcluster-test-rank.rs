//! The rank program the in-process test cluster's workers launch (the same entry point as
//! `qworker rank`), built as a binary of this package so tests can find it.

fn main() {
    if let Err(e) = qworker::rank::rank_main() {
        eprintln!("rank failed: {e:#}");
        std::process::exit(1);
    }
}
