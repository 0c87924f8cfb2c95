//! Writes include/sticky_cluster.h from the crate's source with cbindgen and cbindgen.toml; with
//! `--check`, compares instead and fails when the committed header is stale (CI runs that).
//!
//! cbindgen reads source, not macro output, so the exports declared with `sticky_fn!` are expanded here
//! first (the macro's own `#[no_mangle] extern "C"`), into one file cbindgen reads. An export written by
//! hand (`#[no_mangle]` or `#[export_name]` outside `sticky_fn!`) is refused: it could miss the panic
//! boundary. A plain `extern "C" fn` (a signal handler) exports no symbol and is left alone.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use quote::ToTokens;
use syn::parse::{Parse, ParseStream};
use syn::{parse_quote, Item, ItemFn};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let check = std::env::args().skip(1).any(|arg| arg == "--check");
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header_path = crate_dir.join("include/sticky_cluster.h");
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).map_err(|e| format!("cbindgen.toml: {e}"))?;
    let expanded = expand_crate(&crate_dir.join("src/lib.rs"))?;
    let scratch = std::env::temp_dir().join(format!("sticky-cluster-header-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let source = scratch.join("lib.rs");
    let written = std::fs::write(&source, expanded.into_token_stream().to_string());
    let bindings = written.map_err(|e| format!("{}: {e}", source.display())).and_then(|()| {
        cbindgen::Builder::new().with_src(&source).with_config(config).generate().map_err(|e| format!("cbindgen: {e}"))
    });
    let _ = std::fs::remove_dir_all(&scratch);
    let mut fresh = Vec::new();
    bindings?.write(&mut fresh);
    if check {
        let committed = std::fs::read(&header_path).unwrap_or_default();
        if committed != fresh {
            return Err(format!(
                "{} is stale: run `cargo run -p sticky-cluster-ffi --example generate-header`",
                header_path.display()
            ));
        }
        eprintln!("{} is up to date", header_path.display());
    } else {
        std::fs::write(&header_path, &fresh).map_err(|e| format!("{}: {e}", header_path.display()))?;
        eprintln!("wrote {}", header_path.display());
    }
    Ok(())
}

/// The crate as one file: `mod name;` replaced by the module's items, `sticky_fn!` by the functions it makes.
fn expand_crate(lib: &Path) -> Result<syn::File, String> {
    let text = std::fs::read_to_string(lib).map_err(|e| format!("{}: {e}", lib.display()))?;
    let mut file = syn::parse_file(&text).map_err(|e| format!("{}: {e}", lib.display()))?;
    let dir = lib.parent().map(Path::to_path_buf).unwrap_or_default();
    file.items = expand_items(file.items, &dir, lib)?;
    Ok(file)
}

fn expand_items(items: Vec<Item>, dir: &Path, origin: &Path) -> Result<Vec<Item>, String> {
    let mut expanded = Vec::new();
    for item in items {
        if is_test_only(&item) {
            continue;
        }
        match item {
            Item::Mod(mut module) => {
                let inner = match module.content.take() {
                    Some((_, inner)) => expand_items(inner, &dir.join(module.ident.to_string()), origin)?,
                    None => {
                        let path: PathBuf = dir.join(format!("{}.rs", module.ident));
                        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                        let items = syn::parse_file(&text).map_err(|e| format!("{}: {e}", path.display()))?.items;
                        expand_items(items, &dir.join(module.ident.to_string()), &path)?
                    }
                };
                module.content = Some((Default::default(), inner));
                module.semi = None;
                expanded.push(Item::Mod(module));
            }
            Item::Macro(invocation) if invocation.mac.path.is_ident("sticky_fn") => {
                let export: Export =
                    invocation.mac.parse_body().map_err(|e| format!("sticky_fn! in {}: {e}", origin.display()))?;
                let mut function = export.function;
                function.sig.abi = Some(parse_quote!(extern "C"));
                function.attrs.push(parse_quote!(#[no_mangle]));
                expanded.push(Item::Fn(function));
            }
            Item::Fn(function)
                if function
                    .attrs
                    .iter()
                    .any(|a| a.path().is_ident("no_mangle") || a.path().is_ident("export_name")) =>
            {
                return Err(format!(
                    "{} in {}: declare C exports with sticky_fn! (it adds the panic boundary)",
                    function.sig.ident,
                    origin.display()
                ));
            }
            other => expanded.push(other),
        }
    }
    Ok(expanded)
}

/// `#[cfg(test)]` items are no part of the library.
fn is_test_only(item: &Item) -> bool {
    let attrs = match item {
        Item::Mod(module) => &module.attrs,
        Item::Fn(function) => &function.attrs,
        Item::Macro(invocation) => &invocation.attrs,
        _ => return false,
    };
    attrs.iter().any(|attr| attr.path().is_ident("cfg") && attr.to_token_stream().to_string().contains("test"))
}

/// What `sticky_fn!` takes: a function, then `?= value` when its failure is not its return type's.
struct Export {
    function: ItemFn,
}

impl Parse for Export {
    fn parse(input: ParseStream) -> syn::Result<Export> {
        let function: ItemFn = input.parse()?;
        if input.peek(syn::Token![?]) {
            input.parse::<syn::Token![?]>()?;
            input.parse::<syn::Token![=]>()?;
            input.parse::<syn::Expr>()?;
        }
        Ok(Export { function })
    }
}
