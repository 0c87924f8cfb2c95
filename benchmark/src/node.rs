//! The Node side of the benchmarks: where its scripts live, installing the npm peers they compare against,
//! and whether the Node binding of sticky-cluster is there to test.

use std::path::{Path, PathBuf};
use std::process::Command;

/// benchmark/node: package.json pinning the npm peers, and the Node workers and hash script.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("node")
}

/// The workspace's node-binding folder (npm package sticky-cluster-native).
pub fn binding_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("node-binding")
}

/// `node --version`, when Node is installed.
pub fn version() -> Option<String> {
    let output = Command::new("node").arg("--version").output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Installs benchmark/node's pinned packages with npm unless they are there, and returns the folder.
pub fn ensure_modules() -> Result<PathBuf, String> {
    let dir = dir();
    version().ok_or("node is not installed")?;
    let wanted = ["sticky-cluster", "@socket.io/sticky", "string-hash"];
    if wanted.iter().all(|name| dir.join("node_modules").join(name).join("package.json").exists()) {
        return Ok(dir);
    }
    eprintln!("installing the npm peers in {} ...", dir.display());
    let output = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .output()
        .map_err(|e| format!("cannot run npm: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("npm install failed: {}", stderr.lines().last().unwrap_or("").trim()));
    }
    Ok(dir)
}
