//! The fine-tuning service's persistent state in one place. Under `<data_dir>`:
//!
//! - `rewind.lock`: held (flock) by the one server using the directory ([`lock`]);
//! - `rewind.db`: an embedded SQLite database (files, jobs, events, checkpoints) in WAL mode
//!   with `synchronous = FULL`, so every committed change survives power loss;
//! - `files/<id>`: file contents (uploads and result files), each written through
//!   [`crate::durable::write_file`] (temporary name, fsync, rename, directory fsync) before its
//!   record is committed, so a record never points at a missing or half-written blob;
//! - `models.json`: the engine's registry of fine-tuned models, `models/<dir>`: their weights,
//!   each directory published whole by [`crate::durable::publish_dir`];
//! - `jobs/<id>/checkpoint`: a running job's resumable trainer state, published the same way.
//!
//! [`open_data_dir`] takes the lock and repairs what a crash interrupted, before anything else
//! reads or writes the directory.
//!
//! Rows keep their insertion order (`seq`), which is the order every listing uses: newest first,
//! with `after=<id>` returning what comes after that id in the listing, as the official client
//! paginates.

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

pub mod lock;

pub use lock::DataDirLock;

/// An uploaded (or produced) file's record; its content is the blob at [`Store::blob_path`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub id: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
}

/// A job's failure, as the job object carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

/// rewind's own job options (the `rewind` extension field of a create request).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewindOptions {
    /// Reversible coupling scheme to train with, e.g. `midpoint(a=-0.125)`; default: the model's own.
    #[serde(default)]
    pub scheme: Option<String>,
    /// `reversible`, `checkpoint` or `store`; default: reversible when the scheme is, else checkpoint.
    #[serde(default)]
    pub strategy: Option<String>,
    /// LoRA rank; 0 or absent trains every weight.
    #[serde(default)]
    pub lora_rank: Option<usize>,
    #[serde(default)]
    pub lora_alpha: Option<f64>,
}

/// A fine-tuning job: what the client asked for and where it stands. Both the current
/// (`fine_tuning.job`) and the legacy (`fine-tune`) API render views of this record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub created_at: u64,
    pub updated_at: u64,
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    /// `validating_files`, `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    pub fine_tuned_model: Option<String>,
    pub finished_at: Option<u64>,
    pub error: Option<JobError>,
    /// `n_epochs`, `batch_size`, `learning_rate_multiplier`: "auto" until resolved.
    pub hyperparameters: Value,
    pub result_files: Vec<String>,
    pub trained_tokens: Option<u64>,
    pub seed: u64,
    pub suffix: Option<String>,
    pub metadata: Option<Value>,
    pub rewind: RewindOptions,
    /// Created through `/v1/fine-tunes`.
    pub legacy: bool,
    /// Trainer starts that have not ended cleanly (the process stopped or crashed during them),
    /// counted before each start (see `jobs::runner`).
    #[serde(default)]
    pub attempts: u32,
}

impl JobRecord {
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub id: String,
    pub job_id: String,
    pub created_at: u64,
    pub level: String,
    pub message: String,
    /// `message` or `metrics`.
    pub kind: String,
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub id: String,
    pub job_id: String,
    pub created_at: u64,
    pub step_number: u64,
    pub fine_tuned_model_checkpoint: String,
    pub metrics: Value,
}

/// A `limit` that means "everything" (the largest SQLite accepts once the look-ahead row is added).
pub const ALL: usize = (i64::MAX - 1) as usize;

/// One page of a newest-first listing.
pub struct Page<T> {
    pub data: Vec<T>,
    pub has_more: bool,
}

pub struct Store {
    db: Mutex<Connection>,
    blobs: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, body TEXT NOT NULL, purpose TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, body TEXT NOT NULL, status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints(job_id, seq);
";

/// A random id with OpenAI's prefix style (`file-…`, `ftjob-…`).
pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..24]
    )
}

fn to_json<T: Serialize>(value: &T) -> Result<String> {
    Ok(serde_json::to_string(value)?)
}

fn from_json<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T> {
    serde_json::from_str(text).context("a corrupt row in the database")
}

impl Store {
    /// Opens (creating if needed) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let blobs = data_dir.join("files");
        crate::durable::create_dir_all(&blobs)?;
        let path = data_dir.join("rewind.db");
        let db = Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // WAL: a reader (an HTTP handler) never waits for the runner's writes. `synchronous =
        // FULL`: in WAL mode NORMAL survives a process crash but may lose the last commits on
        // power loss; FULL fsyncs the WAL at every commit, so a job state transition, an upload's
        // record or a checkpoint row, once committed, survives power loss too (SQLite docs,
        // "PRAGMA synchronous"). Commits here are few (a few per training step at most).
        let mode: String =
            db.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(
                path = %path.display(),
                "SQLite kept journal_mode {mode} (WAL unsupported on this filesystem)"
            );
        }
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(SCHEMA)
            .context("creating the database schema")?;
        Ok(Self {
            db: Mutex::new(db),
            blobs,
        })
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        // Every write is one statement, so a panic elsewhere cannot leave a half-applied change.
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn blob_path(&self, id: &str) -> PathBuf {
        self.blobs.join(id)
    }

    /// Writes a file's content durably (fsynced, with its directory entry), then commits its
    /// record: once this returns, both survive a crash or power loss, and a record never points
    /// at a missing blob.
    pub fn insert_file(&self, record: &FileRecord, content: &[u8]) -> Result<()> {
        crate::durable::write_file(&self.blob_path(&record.id), content)?;
        self.insert_file_record(record)
    }

    /// Where the content of file `id` is written while it arrives (an upload streamed to disk),
    /// before [`Store::insert_pending_file`] publishes it. Dropped unpublished, it is removed.
    pub fn pending_file(&self, id: &str) -> Result<crate::durable::PendingFile> {
        crate::durable::PendingFile::new(&self.blob_path(id))
    }

    /// [`Store::insert_file`] for content already written to `content` (from
    /// [`Store::pending_file`] with the record's id): published durably, then the record
    /// committed.
    pub fn insert_pending_file(
        &self,
        record: &FileRecord,
        content: crate::durable::PendingFile,
    ) -> Result<()> {
        anyhow::ensure!(
            content.target() == self.blob_path(&record.id),
            "the content of {} was written for another file",
            record.id
        );
        content.publish()?;
        self.insert_file_record(record)
    }

    fn insert_file_record(&self, record: &FileRecord) -> Result<()> {
        self.db().execute(
            "INSERT INTO files (id, body, purpose) VALUES (?1, ?2, ?3)",
            params![record.id, to_json(record)?, record.purpose],
        )?;
        Ok(())
    }

    pub fn file(&self, id: &str) -> Result<Option<FileRecord>> {
        let body: Option<String> = self
            .db()
            .query_row("SELECT body FROM files WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        body.map(|b| from_json(&b)).transpose()
    }

    pub fn read_file(&self, id: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(id);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// Removes a file's record, then its blob. Returns whether it existed.
    pub fn delete_file(&self, id: &str) -> Result<bool> {
        let removed = self.db().execute("DELETE FROM files WHERE id = ?1", [id])? > 0;
        if removed {
            let _ = std::fs::remove_file(self.blob_path(id));
        }
        Ok(removed)
    }

    pub fn list_files(
        &self,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
        ascending: bool,
    ) -> Result<Page<FileRecord>> {
        let (cmp, order) = if ascending {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        let sql = format!(
            "SELECT body FROM files WHERE (?1 IS NULL OR purpose = ?1) \
             AND (?2 IS NULL OR seq {cmp} (SELECT seq FROM files WHERE id = ?2)) ORDER BY seq {order} LIMIT ?3"
        );
        self.page(&sql, params![purpose, after, limit as i64 + 1], limit)
    }

    fn page<T: for<'de> Deserialize<'de>>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        limit: usize,
    ) -> Result<Page<T>> {
        let db = self.db();
        let mut stmt = db.prepare(sql)?;
        let rows: Vec<String> = stmt
            .query_map(params, |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let has_more = rows.len() > limit;
        let data = rows
            .iter()
            .take(limit)
            .map(|b| from_json(b))
            .collect::<Result<_>>()?;
        Ok(Page { data, has_more })
    }

    pub fn insert_job(&self, job: &JobRecord) -> Result<()> {
        self.db().execute(
            "INSERT INTO jobs (id, body, status) VALUES (?1, ?2, ?3)",
            params![job.id, to_json(job)?, job.status],
        )?;
        Ok(())
    }

    pub fn update_job(&self, job: &JobRecord) -> Result<()> {
        self.db().execute(
            "UPDATE jobs SET body = ?2, status = ?3 WHERE id = ?1",
            params![job.id, to_json(job)?, job.status],
        )?;
        Ok(())
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRecord>> {
        let body: Option<String> = self
            .db()
            .query_row("SELECT body FROM jobs WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        body.map(|b| from_json(&b)).transpose()
    }

    pub fn list_jobs(&self, after: Option<&str>, limit: usize) -> Result<Page<JobRecord>> {
        let sql = "SELECT body FROM jobs WHERE (?1 IS NULL OR seq < (SELECT seq FROM jobs WHERE id = ?1)) ORDER BY seq DESC LIMIT ?2";
        self.page(sql, params![after, limit as i64 + 1], limit)
    }

    /// Jobs that had not finished when the server last stopped, oldest first.
    pub fn unfinished_jobs(&self) -> Result<Vec<JobRecord>> {
        let sql = "SELECT body FROM jobs WHERE status IN ('validating_files', 'queued', 'running') ORDER BY seq ASC";
        Ok(self.page(sql, [], ALL)?.data)
    }

    pub fn insert_event(&self, event: &EventRecord) -> Result<()> {
        self.db().execute(
            "INSERT INTO events (id, job_id, body) VALUES (?1, ?2, ?3)",
            params![event.id, event.job_id, to_json(event)?],
        )?;
        Ok(())
    }

    /// A job's events, newest first.
    pub fn list_events(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<EventRecord>> {
        let sql = "SELECT body FROM events WHERE job_id = ?1 AND (?2 IS NULL OR seq < (SELECT seq FROM events WHERE id = ?2)) \
                   ORDER BY seq DESC LIMIT ?3";
        self.page(sql, params![job_id, after, limit as i64 + 1], limit)
    }

    /// A job's events oldest first, starting after the `skip` first ones (for streaming).
    pub fn events_since(&self, job_id: &str, skip: usize) -> Result<Vec<EventRecord>> {
        let sql = "SELECT body FROM events WHERE job_id = ?1 ORDER BY seq ASC LIMIT -1 OFFSET ?2";
        Ok(self.page(sql, params![job_id, skip as i64], ALL)?.data)
    }

    pub fn insert_checkpoint(&self, checkpoint: &CheckpointRecord) -> Result<()> {
        self.db().execute(
            "INSERT INTO checkpoints (id, job_id, body) VALUES (?1, ?2, ?3)",
            params![checkpoint.id, checkpoint.job_id, to_json(checkpoint)?],
        )?;
        Ok(())
    }

    pub fn list_checkpoints(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<CheckpointRecord>> {
        let sql = "SELECT body FROM checkpoints WHERE job_id = ?1 AND (?2 IS NULL OR seq < (SELECT seq FROM checkpoints WHERE id = ?2)) \
                   ORDER BY seq DESC LIMIT ?3";
        self.page(sql, params![job_id, after, limit as i64 + 1], limit)
    }

    pub fn delete_checkpoint(&self, id: &str) -> Result<()> {
        self.db()
            .execute("DELETE FROM checkpoints WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Whether a checkpoint for this step is already recorded (a resumed job replays none twice).
    pub fn has_checkpoint(&self, job_id: &str, step: u64) -> Result<bool> {
        Ok(self
            .list_checkpoints(job_id, None, ALL)?
            .data
            .iter()
            .any(|c| c.step_number == step))
    }
}

/// Takes `data_dir` for this process ([`DataDirLock`]: fails at once if another process has it),
/// then repairs what a crash left half-done (see [`crate::durable`]): unfinished writes are
/// removed, and a model or checkpoint directory caught between its two renames is put back. Call
/// it before anything else touches the directory; keep the lock for as long as the server runs.
pub fn open_data_dir(data_dir: &Path) -> Result<DataDirLock> {
    let lock = DataDirLock::acquire(data_dir)?;
    let mut dirs = vec![
        data_dir.to_path_buf(),
        data_dir.join("files"),
        data_dir.join("models"),
    ];
    let jobs = data_dir.join("jobs");
    if jobs.is_dir() {
        for entry in
            std::fs::read_dir(&jobs).with_context(|| format!("reading {}", jobs.display()))?
        {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                dirs.push(entry.path());
            }
        }
        dirs.push(jobs);
    }
    let mut repaired = 0;
    for dir in &dirs {
        repaired += crate::durable::recover(dir)?;
    }
    if repaired > 0 {
        tracing::warn!(
            data_dir = %data_dir.display(),
            repaired,
            "repaired writes a crash interrupted"
        );
    }
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(id: &str, purpose: &str) -> FileRecord {
        FileRecord {
            id: id.into(),
            bytes: 3,
            created_at: 1,
            filename: "a.jsonl".into(),
            purpose: purpose.into(),
        }
    }

    /// Committed changes must survive power loss, not just a process crash: WAL with
    /// `synchronous = FULL` (2).
    #[test]
    fn the_database_is_durable_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let db = store.db();
        let mode: String = db
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        let synchronous: i64 = db
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!((mode.as_str(), synchronous), ("wal", 2));
    }

    /// Start-up repairs leftovers in every directory that holds state, and refuses a second
    /// holder of the directory.
    #[test]
    fn opening_the_data_dir_repairs_interrupted_writes() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        let model = data.join("models").join("ftjob-1-step-8");
        crate::durable::publish_dir(&model, |d| Ok(std::fs::write(d.join("config.json"), "{}")?))
            .unwrap();
        // A model directory moved aside, its replacement never renamed in; a half-written one.
        std::fs::rename(&model, crate::durable::aside_dir_path(&model).unwrap()).unwrap();
        std::fs::create_dir(crate::durable::temp_dir_path(&model).unwrap()).unwrap();
        // A half-written trainer checkpoint beside the complete one.
        let checkpoint = data.join("jobs").join("ftjob-1").join("checkpoint");
        crate::durable::publish_dir(&checkpoint, |d| {
            Ok(std::fs::write(d.join("state.json"), "{}")?)
        })
        .unwrap();
        std::fs::create_dir(crate::durable::temp_dir_path(&checkpoint).unwrap()).unwrap();
        // Unfinished blob and registry writes.
        std::fs::create_dir_all(data.join("files")).unwrap();
        std::fs::write(data.join("files").join(".file-1.7-0.rewind-tmp"), "par").unwrap();
        std::fs::write(data.join(".models.json.7-1.rewind-tmp"), "[").unwrap();

        let lock = open_data_dir(data).unwrap();
        let listing = |d: &Path| -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        assert_eq!(listing(&data.join("models")), ["ftjob-1-step-8"]);
        assert!(model.join("config.json").is_file());
        assert_eq!(listing(&data.join("jobs").join("ftjob-1")), ["checkpoint"]);
        assert!(listing(&data.join("files")).is_empty());
        assert_eq!(listing(data), ["files", "jobs", "models", lock::LOCK_FILE]);
        drop(lock);
    }

    #[test]
    fn files_page_newest_first_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..3 {
            store
                .insert_file(&file(&format!("file-{i}"), "fine-tune"), b"abc")
                .unwrap();
        }
        store
            .insert_file(&file("file-r", "fine-tune-results"), b"x,y")
            .unwrap();
        let first = store.list_files(Some("fine-tune"), None, 2, false).unwrap();
        assert_eq!(
            first.data.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
            ["file-2", "file-1"]
        );
        assert!(first.has_more);
        let rest = store
            .list_files(Some("fine-tune"), Some("file-1"), 2, false)
            .unwrap();
        assert_eq!(
            rest.data.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
            ["file-0"]
        );
        assert!(!rest.has_more);
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.read_file("file-0").unwrap(), b"abc");
        assert!(store.delete_file("file-0").unwrap());
        assert!(store.file("file-0").unwrap().is_none() && !store.blob_path("file-0").exists());
        assert!(!store.delete_file("file-0").unwrap());
    }

    #[test]
    fn a_pending_file_is_published_with_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let pending = store.pending_file("file-p").unwrap();
        std::fs::write(pending.path(), b"streamed").unwrap();
        // Content written for one id is never published under another.
        assert!(store
            .insert_pending_file(&file("file-q", "batch"), pending)
            .is_err());
        assert!(store.file("file-q").unwrap().is_none());
        let pending = store.pending_file("file-p").unwrap();
        std::fs::write(pending.path(), b"streamed").unwrap();
        store
            .insert_pending_file(&file("file-p", "batch"), pending)
            .unwrap();
        assert_eq!(store.read_file("file-p").unwrap(), b"streamed");
        assert_eq!(store.file("file-p").unwrap().unwrap().purpose, "batch");
        let names: Vec<String> = std::fs::read_dir(dir.path().join("files"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["file-p"]);
    }
}
