//! Writes include/sticky_cluster.h from the crate's source with cbindgen and cbindgen.toml;
//! with `--check`, compares instead and fails when the committed header is stale (CI runs that).

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().skip(1).any(|arg| arg == "--check");
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header_path = crate_dir.join("include/sticky_cluster.h");
    let config = match cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: cbindgen.toml: {error}");
            return ExitCode::FAILURE;
        }
    };
    let bindings = match cbindgen::Builder::new().with_crate(crate_dir).with_config(config).generate() {
        Ok(bindings) => bindings,
        Err(error) => {
            eprintln!("error: cbindgen: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    if check {
        let committed = std::fs::read(&header_path).unwrap_or_default();
        if committed != fresh {
            eprintln!(
                "error: {} is stale: run `cargo run -p sticky-cluster-ffi --example generate-header`",
                header_path.display()
            );
            return ExitCode::FAILURE;
        }
        eprintln!("{} is up to date", header_path.display());
    } else if let Err(error) = std::fs::write(&header_path, &fresh) {
        eprintln!("error: {}: {error}", header_path.display());
        return ExitCode::FAILURE;
    } else {
        eprintln!("wrote {}", header_path.display());
    }
    ExitCode::SUCCESS
}
