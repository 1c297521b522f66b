//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The default model, fetched by `.ci/run` (or `rewind pull`) before the tests run.
pub fn default_model() -> PathBuf {
    rewind::provision::resolve(None).expect("the default model is provisioned (run `rewind pull`)")
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests").join("fixtures").join(name)
}
