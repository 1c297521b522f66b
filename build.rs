//! Links OpenBLAS for the CPU matrix products when the `openblas` feature is on *and* the library
//! is found; otherwise the build goes on with candle's own GEMM and says so in one warning, so a
//! machine with only a Rust toolchain builds rewind (`docs/benchmarks.md` measures both paths).

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(rewind_openblas)");
    println!("cargo::rerun-if-env-changed=OPENBLAS_LIB_DIR");
    println!("cargo::rerun-if-env-changed=LIBRARY_PATH");
    if env::var_os("CARGO_FEATURE_OPENBLAS").is_none() {
        return;
    }
    match find_openblas() {
        Some(dir) => {
            println!("cargo::rustc-link-search=native={}", dir.display());
            println!("cargo::rustc-link-lib=openblas");
            println!("cargo::rustc-cfg=rewind_openblas");
        }
        None => println!(
            "cargo::warning=OpenBLAS not found (install libopenblas-dev or set OPENBLAS_LIB_DIR): \
             CPU matrix products use candle's GEMM"
        ),
    }
}

/// The first directory holding a linkable OpenBLAS: `OPENBLAS_LIB_DIR`, then `LIBRARY_PATH`,
/// then the usual system and Homebrew locations (Debian's multiarch directory included).
fn find_openblas() -> Option<PathBuf> {
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let names: &[&str] = match target_os.as_str() {
        "macos" => &["libopenblas.dylib", "libopenblas.a"],
        "windows" => &["openblas.lib", "libopenblas.lib"],
        _ => &["libopenblas.so", "libopenblas.a"],
    };
    let multiarch = format!(
        "/usr/lib/{}-linux-gnu",
        env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default()
    );
    let mut dirs: Vec<PathBuf> = Vec::new();
    dirs.extend(env::var_os("OPENBLAS_LIB_DIR").map(PathBuf::from));
    if let Some(paths) = env::var_os("LIBRARY_PATH") {
        dirs.extend(env::split_paths(&paths));
    }
    dirs.extend(
        [
            multiarch.as_str(),
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/lib",
            "/opt/homebrew/opt/openblas/lib",
            "/usr/local/opt/openblas/lib",
        ]
        .map(PathBuf::from),
    );
    dirs.into_iter()
        .find(|dir| names.iter().any(|name| Path::new(dir).join(name).exists()))
}
