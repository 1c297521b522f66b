//! `rewind pull [MODEL]`.

use crate::provision;
use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// Known model name (default: the default model).
    pub model: Option<String>,
}

pub fn run(args: PullArgs) -> Result<()> {
    let name = args.model.as_deref().unwrap_or(provision::DEFAULT_MODEL);
    let Some(known) = provision::find_known(name) else {
        let names: Vec<&str> = provision::KNOWN_MODELS.iter().map(|m| m.name).collect();
        bail!(
            "unknown model `{name}`: rewind can pull {}",
            names.join(", ")
        );
    };
    let path = provision::ensure(known, &provision::models_dir())?;
    println!("{}", path.display());
    Ok(())
}
