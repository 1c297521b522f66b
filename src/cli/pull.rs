//! `rewind pull [MODEL]`.

use crate::provision;
use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// Known model name (default: the default model, the converted SmolLM2, whose base
    /// SmolLM2-135M-Instruct GGUF is fetched).
    pub model: Option<String>,
}

pub fn run(args: PullArgs) -> Result<()> {
    let name = args.model.as_deref().unwrap_or(provision::DEFAULT_MODEL);
    let known = provision::known_names();
    if !known.iter().any(|k| k.eq_ignore_ascii_case(name)) && provision::find_known(name).is_none()
    {
        bail!(
            "unknown model `{name}`: rewind can pull {}",
            known.join(", ")
        );
    }
    // The converted default model is a shipped delta: pulling it fetches its base.
    let path = provision::resolve(Some(name))?;
    println!("{}", path.display());
    Ok(())
}
