//! Gives the shared library a SONAME, so programs linked against it record a versioned name:
//! `libsticky_cluster.so.MAJOR`, or `.so.0.MINOR` before 1.0 (where a minor release may change the ABI).

fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    let minor = std::env::var("CARGO_PKG_VERSION_MINOR").unwrap_or_else(|_| "0".into());
    let abi = if major == "0" { format!("0.{minor}") } else { major };
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libsticky_cluster.so.{abi}");
    println!("cargo:rerun-if-changed=build.rs");
}
