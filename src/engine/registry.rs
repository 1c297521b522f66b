//! The models the server knows, shared between the HTTP layer and the engine thread.
//!
//! The engine thread holds the weights; this registry holds what the edge needs to validate a
//! request before queueing it (tokenizer, chat template, context length, KV cost) plus each
//! model's public card. Models can be added while the server runs (the fine-tuning service
//! registers a finished job's model through [`crate::engine::Engine::add_model`]); fine-tuned
//! ones are recorded in `<data_dir>/models.json` so they are served again after a restart.

use crate::engine::constraint::TokenTable;
use crate::model::loader::WeightFormat;
use crate::text::chat_template::ChatTemplate;
use crate::text::tokenizer::TextTokenizer;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, RwLock};

/// Prefix of fine-tuned model ids (`ft:{base}:{org}:{suffix}:{id}`); only these can be deleted.
pub const FINE_TUNED_PREFIX: &str = "ft:";

/// Everything needed to load and describe a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub id: String,
    /// A known model name, a `.gguf` file or a model directory.
    pub source: String,
    #[serde(default)]
    pub scheme: Option<String>,
    pub format: WeightFormat,
    /// Unix seconds.
    pub created: u64,
    pub owned_by: String,
}

impl ModelSpec {
    pub fn is_fine_tuned(&self) -> bool {
        self.id.starts_with(FINE_TUNED_PREFIX)
    }
}

/// A loaded model as the HTTP layer sees it (the weights stay on the engine thread).
pub struct ServedModel {
    pub id: String,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    /// Positions the model can attend over (prompt + completion).
    pub context_length: usize,
    /// KV cache bytes one position costs.
    pub kv_bytes_per_token: usize,
    /// Entries in a logits row.
    pub vocab_size: usize,
    /// Whether the chat template renders a `tools` list.
    pub supports_tools: bool,
    tokens: OnceLock<TokenTable>,
}

impl ServedModel {
    pub fn new(
        id: String,
        tokenizer: TextTokenizer,
        template: ChatTemplate,
        context_length: usize,
        kv_bytes_per_token: usize,
        vocab_size: usize,
    ) -> Self {
        // HF templates that support tools read the `tools` variable; the others ignore it.
        let supports_tools = template.source().contains("tools");
        Self {
            id,
            tokenizer,
            template,
            context_length,
            kv_bytes_per_token,
            vocab_size,
            supports_tools,
            tokens: OnceLock::new(),
        }
    }

    /// The vocabulary indexed for constrained decoding, built on first use.
    pub fn token_table(&self) -> &TokenTable {
        self.tokens
            .get_or_init(|| TokenTable::new(&self.tokenizer, self.vocab_size))
    }

    /// Worst-case KV cache bytes of one sequence that may reach `positions`: the cache grows by
    /// doubling from 16 (see `LayerKv::append`).
    pub fn kv_bytes_for(&self, positions: usize) -> usize {
        positions
            .min(self.context_length)
            .next_power_of_two()
            .max(16)
            .saturating_mul(self.kv_bytes_per_token)
    }
}

#[derive(Clone)]
pub enum ModelState {
    Loading,
    Ready(Arc<ServedModel>),
    Failed(String),
}

/// What a lookup by id found.
pub enum Lookup {
    Ready(Arc<ServedModel>),
    Loading,
    Failed(String),
    NotFound,
}

#[derive(Default)]
pub struct Registry {
    entries: RwLock<BTreeMap<String, (ModelSpec, ModelState)>>,
    /// Where fine-tuned models are recorded; None keeps them in memory only.
    store: Option<PathBuf>,
}

impl Registry {
    pub fn new(store: Option<PathBuf>) -> Self {
        Self {
            entries: RwLock::new(BTreeMap::new()),
            store,
        }
    }

    /// The fine-tuned models recorded by an earlier run.
    pub fn stored_fine_tuned(&self) -> Result<Vec<ModelSpec>> {
        match &self.store {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("{}: invalid model registry", path.display()))
            }
            _ => Ok(Vec::new()),
        }
    }

    fn persist(&self, entries: &BTreeMap<String, (ModelSpec, ModelState)>) -> Result<()> {
        let Some(path) = &self.store else {
            return Ok(());
        };
        let specs: Vec<&ModelSpec> = entries
            .values()
            .map(|(s, _)| s)
            .filter(|s| s.is_fine_tuned())
            .collect();
        // Durable before the caller goes on: a model the registry has recorded is served again
        // after a crash or power loss.
        crate::durable::write_file(path, &serde_json::to_vec_pretty(&specs)?)
    }

    pub fn specs(&self) -> Vec<ModelSpec> {
        self.read().values().map(|(s, _)| s.clone()).collect()
    }

    pub fn spec(&self, id: &str) -> Option<ModelSpec> {
        self.read().get(id).map(|(s, _)| s.clone())
    }

    pub fn lookup(&self, id: &str) -> Lookup {
        match self.read().get(id) {
            None => Lookup::NotFound,
            Some((_, ModelState::Loading)) => Lookup::Loading,
            Some((_, ModelState::Failed(e))) => Lookup::Failed(e.clone()),
            Some((_, ModelState::Ready(m))) => Lookup::Ready(m.clone()),
        }
    }

    /// True once every base (non-fine-tuned) model is loaded.
    pub fn base_models_ready(&self) -> bool {
        let entries = self.read();
        let mut base = entries
            .values()
            .filter(|(s, _)| !s.is_fine_tuned())
            .peekable();
        base.peek().is_some() && base.all(|(_, state)| matches!(state, ModelState::Ready(_)))
    }

    /// A load failure of a base model, if any.
    pub fn base_model_failure(&self) -> Option<String> {
        self.read().values().find_map(|(s, state)| match state {
            ModelState::Failed(e) if !s.is_fine_tuned() => Some(format!("{}: {e}", s.id)),
            _ => None,
        })
    }

    /// Adds (or replaces) a model in the `Loading` state; fine-tuned ones are recorded.
    pub fn insert_loading(&self, spec: ModelSpec) -> Result<()> {
        let mut entries = self.write();
        entries.insert(spec.id.clone(), (spec, ModelState::Loading));
        self.persist(&entries)
    }

    pub fn set_state(&self, id: &str, state: ModelState) {
        if let Some(entry) = self.write().get_mut(id) {
            entry.1 = state;
        }
    }

    /// Removes a model; returns its spec if it was there.
    pub fn remove(&self, id: &str) -> Result<Option<ModelSpec>> {
        let mut entries = self.write();
        let removed = entries.remove(id).map(|(s, _)| s);
        if removed.as_ref().is_some_and(ModelSpec::is_fine_tuned) {
            self.persist(&entries)?;
        }
        Ok(removed)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, (ModelSpec, ModelState)>> {
        // A panic while holding the lock cannot leave the map half-updated (every update is a
        // single insert or assignment), so a poisoned lock is still safe to use.
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, (ModelSpec, ModelState)>> {
        self.entries.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> ModelSpec {
        ModelSpec {
            id: id.into(),
            source: "x.gguf".into(),
            scheme: None,
            format: WeightFormat::Quantized,
            created: 1,
            owned_by: "me".into(),
        }
    }

    #[test]
    fn fine_tuned_models_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("models.json");
        let r = Registry::new(Some(path.clone()));
        r.insert_loading(spec("base")).unwrap();
        r.insert_loading(spec("ft:base:me::abc")).unwrap();
        assert!(matches!(r.lookup("ft:base:me::abc"), Lookup::Loading));
        assert!(!r.base_models_ready());
        r.set_state("base", ModelState::Failed("boom".into()));
        assert_eq!(r.base_model_failure().as_deref(), Some("base: boom"));

        let again = Registry::new(Some(path.clone()));
        assert_eq!(
            again.stored_fine_tuned().unwrap(),
            [spec("ft:base:me::abc")]
        );
        r.remove("ft:base:me::abc").unwrap();
        assert!(Registry::new(Some(path))
            .stored_fine_tuned()
            .unwrap()
            .is_empty());
        assert!(matches!(r.lookup("ft:base:me::abc"), Lookup::NotFound));
    }
}
