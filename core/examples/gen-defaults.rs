//! Writes `node-binding/js/defaults.json` from core's defaults (`sticky_cluster::config::defaults`), so the
//! JavaScript implementation uses the same defaults and bounds; `--check` compares instead of writing.

use std::path::Path;
use std::process::ExitCode;

use sticky_cluster::config::defaults::{shared_json, SHARED_JSON_PATH};

fn main() -> ExitCode {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(SHARED_JSON_PATH);
    let fresh = shared_json();
    if std::env::args().skip(1).any(|arg| arg == "--check") {
        return match std::fs::read_to_string(&path) {
            Ok(committed) if committed == fresh => {
                eprintln!("{} is up to date", path.display());
                ExitCode::SUCCESS
            }
            _ => {
                eprintln!(
                    "error: {} is stale: run `cargo run -p sticky-cluster --example gen-defaults`",
                    path.display()
                );
                ExitCode::FAILURE
            }
        };
    }
    match std::fs::write(&path, fresh) {
        Ok(()) => {
            eprintln!("wrote {}", path.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}: {error}", path.display());
            ExitCode::FAILURE
        }
    }
}
