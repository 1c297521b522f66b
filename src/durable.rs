//! Crash-safe writes for every file and directory that holds state (the model registry, uploaded
//! and result files, trainer checkpoints, saved models). A crash or power loss at any instant
//! leaves either the previous complete version or the new complete version under the final
//! name, never a mix, and the leftovers it can leave are recognisable by name so that
//! [`recover`] can clean them up at the next start.
//!
//! - Files ([`write_file`], [`replace_file`], [`PendingFile`]): written to a temporary sibling
//!   (`.{name}.{pid}-{n}.rewind-tmp`), fsynced, renamed over the target, then the directory is fsynced
//!   so the rename itself survives power loss (rename(2) is atomic, but only durable once the
//!   directory entry is on disk).
//! - Directories ([`publish_dir`]): filled under `.{name}.rewind-tmp`, every file and the directory
//!   fsynced, then an existing `{name}` is renamed aside to `.{name}.rewind-old`, the new one renamed
//!   in, the parent fsynced, and only then the old one deleted. At every instant `{name}` or
//!   `.{name}.rewind-old` holds a complete directory.
//! - Removal ([`remove_dir`]): renamed to a temporary name first, so a crash mid-deletion never
//!   leaves half a directory under its real name.
//!
//! Recovery ([`recover`], [`recover_dir`]): `.*.rewind-tmp` entries are unfinished writes or deletions
//! and are removed; a `.{name}.rewind-old` is the previous version of `{name}`: put back when `{name}` is
//! missing (the crash came between the two renames), removed otherwise.
//!
//! This module is a leaf (std and tracing only), so `model`, `train` and `store` can all use it.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Suffix of an unfinished write (or deletion): always safe to remove at start-up. Both suffixes
/// name rewind's own entries, so recovery never touches other files in a shared directory.
const TEMP_SUFFIX: &str = ".rewind-tmp";
/// Suffix of the previous version of a directory while its replacement is renamed in.
const ASIDE_SUFFIX: &str = ".rewind-old";

/// Creates `dir` and any missing parents durably: each new directory's entry is fsynced into its
/// parent, so a record that names a path under it never outlives the directory on power loss.
pub fn create_dir_all(dir: &Path) -> Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    create_dir_all(parent_of(dir))?;
    match std::fs::create_dir(dir) {
        Ok(()) => sync_dir(parent_of(dir)),
        // Created meanwhile by another thread: its creator syncs it.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
    }
}

/// Writes `bytes` to `path` atomically and durably (see the module docs).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_file(path, |tmp| {
        std::fs::write(tmp, bytes).with_context(|| format!("writing {}", tmp.display()))
    })
}

/// Like [`write_file`], for writers that take a path (e.g. safetensors): `write` creates the
/// temporary file it is given; it is then fsynced and renamed over `path`.
pub fn replace_file(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let pending = PendingFile::new(path)?;
    write(pending.path())?;
    pending.publish()
}

/// A file on its way to `target`, written under a temporary sibling name (see the module docs)
/// for as long as its writer needs (an upload streamed from the network): [`PendingFile::publish`]
/// fsyncs it and renames it over `target`; dropped unpublished, the temporary is removed (and a
/// crash leaves a name that [`recover`] removes).
#[derive(Debug)]
pub struct PendingFile {
    tmp: PathBuf,
    target: PathBuf,
    published: bool,
}

impl PendingFile {
    /// Creates `target`'s directory if needed and picks the temporary name; the writer creates
    /// the file at [`PendingFile::path`].
    pub fn new(target: &Path) -> Result<Self> {
        let parent = parent_of(target);
        create_dir_all(parent)?;
        Ok(Self {
            tmp: parent.join(temp_file_name(target)?),
            target: target.to_path_buf(),
            published: false,
        })
    }

    /// Where the content is written until it is published.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The name the content gets once published.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// fsyncs the temporary, renames it over the target and fsyncs the directory: once this
    /// returns, the target holds the new content and survives power loss.
    pub fn publish(mut self) -> Result<()> {
        sync_file(&self.tmp)?;
        std::fs::rename(&self.tmp, &self.target)
            .with_context(|| format!("replacing {}", self.target.display()))?;
        self.published = true;
        sync_dir(parent_of(&self.target))
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Publishes a directory at `target`: `fill` writes its contents into the (empty) directory it
/// is given, which is then fsynced and swapped in for any previous `target` (see the module docs).
/// Leftovers of an earlier interrupted publish of `target` are recovered first. If `fill` fails,
/// `target` is untouched.
pub fn publish_dir(target: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    publish_dir_steps(target, fill, usize::MAX)
}

/// The steps of [`publish_dir`], stopping (as a crash would) after `steps` of them; tests
/// simulate every crash point with it.
fn publish_dir_steps(
    target: &Path,
    fill: impl FnOnce(&Path) -> Result<()>,
    steps: usize,
) -> Result<()> {
    let parent = parent_of(target);
    create_dir_all(parent)?;
    recover_dir(target)?;
    let tmp = temp_dir_path(target)?;
    let aside = aside_dir_path(target)?;
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let filled = fill(&tmp).and_then(|()| sync_tree(&tmp));
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Each step leaves a complete directory under `target` or under `aside`.
    let replacing = target.exists();
    let mut step = 0;
    let mut next = || {
        step += 1;
        step <= steps
    };
    if replacing {
        if !next() {
            return Ok(());
        }
        std::fs::rename(target, &aside)
            .with_context(|| format!("moving {} aside", target.display()))?;
    }
    if !next() {
        return Ok(());
    }
    std::fs::rename(&tmp, target).with_context(|| format!("publishing {}", target.display()))?;
    if !next() {
        return Ok(());
    }
    sync_dir(parent)?;
    if replacing {
        if !next() {
            return Ok(());
        }
        std::fs::remove_dir_all(&aside)
            .with_context(|| format!("removing the previous {}", aside.display()))?;
    }
    Ok(())
}

/// Removes the directory `target` (if present) so that it is never seen half-deleted under its
/// name: it is renamed to a temporary name (which [`recover`] removes if a crash interrupts the
/// deletion), the parent fsynced, then deleted.
pub fn remove_dir(target: &Path) -> Result<()> {
    let parent = parent_of(target);
    let doomed = parent.join(temp_file_name(target)?);
    match std::fs::rename(target, &doomed) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        result => result.with_context(|| format!("removing {}", target.display()))?,
    }
    sync_dir(parent)?;
    std::fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))
}

/// Repairs what an interrupted write in `dir` left behind: removes unfinished writes
/// (`.*.rewind-tmp`), and puts back a directory moved aside (`.{name}.rewind-old`) whose replacement never
/// arrived, or removes it when `{name}` is there. A missing `dir` has nothing to repair. Returns
/// how many entries it repaired.
pub fn recover(dir: &Path) -> Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        result => result.with_context(|| format!("reading {}", dir.display()))?,
    };
    let mut repaired = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(hidden) = name.strip_prefix('.') else {
            continue;
        };
        if hidden.ends_with(TEMP_SUFFIX) {
            remove_any(&entry.path())?;
            tracing::warn!(path = %entry.path().display(), "removed an unfinished write");
            repaired += 1;
        } else if let Some(original) = hidden.strip_suffix(ASIDE_SUFFIX) {
            repaired += usize::from(restore_aside(&dir.join(original), &entry.path())?);
        }
    }
    if repaired > 0 {
        sync_dir(dir)?;
    }
    Ok(repaired)
}

/// [`recover`] for the one directory `target`: its temporary and aside siblings only.
pub fn recover_dir(target: &Path) -> Result<()> {
    let tmp = temp_dir_path(target)?;
    let aside = aside_dir_path(target)?;
    let mut repaired = false;
    if tmp.symlink_metadata().is_ok() {
        remove_any(&tmp)?;
        repaired = true;
    }
    if aside.symlink_metadata().is_ok() {
        restore_aside(target, &aside)?;
        repaired = true;
    }
    if repaired {
        sync_dir(parent_of(target))?;
    }
    Ok(())
}

/// Puts `aside` back as `target` if `target` is missing, else removes it. Returns true when it
/// restored.
fn restore_aside(target: &Path, aside: &Path) -> Result<bool> {
    if target.symlink_metadata().is_ok() {
        remove_any(aside)?;
        tracing::warn!(path = %aside.display(), "removed the previous version of a replaced directory");
        Ok(false)
    } else {
        std::fs::rename(aside, target)
            .with_context(|| format!("restoring {} from {}", target.display(), aside.display()))?;
        tracing::warn!(path = %target.display(), "restored after an interrupted replacement");
        Ok(true)
    }
}

fn remove_any(path: &Path) -> Result<()> {
    let is_dir = path.symlink_metadata().is_ok_and(|m| m.is_dir());
    if is_dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
    .with_context(|| format!("removing {}", path.display()))
}

/// fsyncs a file's data and metadata.
pub fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

/// fsyncs a directory, making the creations, renames and removals of its entries durable.
#[cfg(unix)]
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Directories cannot be opened for fsync outside unix; NTFS journals their metadata anyway.
#[cfg(not(unix))]
pub fn sync_dir(_dir: &Path) -> Result<()> {
    Ok(())
}

/// fsyncs every file and directory under `dir`, then `dir` itself.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            sync_file(&entry.path())?;
        }
    }
    sync_dir(dir)
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn name_of(path: &Path) -> Result<&str> {
    match path.file_name().and_then(OsStr::to_str) {
        Some(name) => Ok(name),
        None => bail!("{}: no file name, or not UTF-8", path.display()),
    }
}

/// A temporary name unique within this process (several files of one directory may be written
/// at once: uploads).
fn temp_file_name(path: &Path) -> Result<String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Ok(format!(
        ".{}.{}-{n}{TEMP_SUFFIX}",
        name_of(path)?,
        std::process::id()
    ))
}

/// Where [`publish_dir`] fills the new version of `target`.
pub fn temp_dir_path(target: &Path) -> Result<PathBuf> {
    Ok(parent_of(target).join(format!(".{}{TEMP_SUFFIX}", name_of(target)?)))
}

/// Where [`publish_dir`] moves the previous version of `target` while it swaps the new one in.
pub fn aside_dir_path(target: &Path) -> Result<PathBuf> {
    Ok(parent_of(target).join(format!(".{}{ASIDE_SUFFIX}", name_of(target)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory's files and their contents, sorted.
    fn contents(dir: &Path) -> Vec<(String, String)> {
        let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    std::fs::read_to_string(e.path()).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn version(tag: &str) -> Vec<(String, String)> {
        vec![
            ("a.json".to_string(), format!("{tag}-a")),
            ("b.bin".to_string(), format!("{tag}-b")),
        ]
    }

    fn fill(tag: &'static str) -> impl FnOnce(&Path) -> Result<()> {
        move |dir| {
            for (name, text) in version(tag) {
                std::fs::write(dir.join(name), text)?;
            }
            Ok(())
        }
    }

    #[test]
    fn write_file_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("models.json");
        write_file(&path, b"one").unwrap();
        write_file(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(names(&dir.path().join("sub")), ["models.json"]);

        // A writer that fails leaves the previous content and no temporary.
        let failed = replace_file(&path, |tmp| {
            std::fs::write(tmp, b"half")?;
            bail!("disk full")
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(names(&dir.path().join("sub")), ["models.json"]);
    }

    #[test]
    fn a_pending_file_is_published_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("files").join("file-up");
        // Written in pieces, then dropped unpublished (a failed upload): nothing is left.
        let pending = PendingFile::new(&path).unwrap();
        let mut out = File::create_new(pending.path()).unwrap();
        std::io::Write::write_all(&mut out, b"half").unwrap();
        drop(pending);
        assert!(names(&dir.path().join("files")).is_empty());
        // Published: the target holds the content, and no temporary remains.
        let pending = PendingFile::new(&path).unwrap();
        assert_eq!(pending.target(), path);
        let mut out = File::create_new(pending.path()).unwrap();
        std::io::Write::write_all(&mut out, b"one ").unwrap();
        std::io::Write::write_all(&mut out, b"two").unwrap();
        drop(out);
        pending.publish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one two");
        assert_eq!(names(&dir.path().join("files")), ["file-up"]);
    }

    #[test]
    fn an_unfinished_file_write_is_removed_and_the_old_content_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file-abc");
        write_file(&path, b"complete").unwrap();
        // A crash before the rename: the temporary holds part of the new content.
        let tmp = dir.path().join(temp_file_name(&path).unwrap());
        std::fs::write(&tmp, b"par").unwrap();
        assert_eq!(recover(dir.path()).unwrap(), 1);
        assert_eq!(names(dir.path()), ["file-abc"]);
        assert_eq!(std::fs::read(&path).unwrap(), b"complete");
        assert_eq!(recover(dir.path()).unwrap(), 0);
        assert_eq!(recover(&dir.path().join("missing")).unwrap(), 0);
    }

    #[test]
    fn publish_dir_creates_and_replaces_a_whole_directory() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("models").join("ftjob-1");
        publish_dir(&target, fill("old")).unwrap();
        assert_eq!(contents(&target), version("old"));
        std::fs::write(target.join("stale.txt"), "x").unwrap();
        publish_dir(&target, fill("new")).unwrap();
        // Replaced as a whole: nothing of the old directory survives.
        assert_eq!(contents(&target), version("new"));
        assert_eq!(names(&dir.path().join("models")), ["ftjob-1"]);

        // A failing fill leaves the published directory as it was.
        let failed = publish_dir(&target, |d| {
            std::fs::write(d.join("a.json"), "half")?;
            bail!("out of memory")
        });
        assert!(failed.is_err());
        assert_eq!(contents(&target), version("new"));
        assert_eq!(names(&dir.path().join("models")), ["ftjob-1"]);
    }

    /// A crash after each step of a replacement (and of a first publish): the final name or the
    /// aside one holds a complete version at every point, and recovery leaves exactly one
    /// complete version under the final name, with no leftovers.
    #[test]
    fn every_crash_point_of_a_publish_recovers_to_a_complete_directory() {
        for replacing in [true, false] {
            let steps = if replacing { 4 } else { 2 };
            for crash_after in 0..=steps {
                let dir = tempfile::tempdir().unwrap();
                let target = dir.path().join("checkpoint");
                if replacing {
                    publish_dir(&target, fill("old")).unwrap();
                }
                publish_dir_steps(&target, fill("new"), crash_after).unwrap();

                let aside = aside_dir_path(&target).unwrap();
                let found = if target.exists() {
                    Some(contents(&target))
                } else if aside.exists() {
                    Some(contents(&aside))
                } else {
                    None
                };
                let complete = [Some(version("old")), Some(version("new"))];
                let case = format!("replacing {replacing}, crash after step {crash_after}");
                if replacing || crash_after > 0 {
                    assert!(complete.contains(&found), "{case}: found {found:?}");
                }

                recover(dir.path()).unwrap();
                if !replacing && crash_after == 0 {
                    // Crashed before the first version was published: nothing to find.
                    assert!(names(dir.path()).is_empty(), "{case}");
                    continue;
                }
                assert_eq!(names(dir.path()), ["checkpoint"], "{case}");
                let expected = if crash_after == 0 || (replacing && crash_after == 1) {
                    version("old")
                } else {
                    version("new")
                };
                assert_eq!(contents(&target), expected, "{case}");
            }
        }
    }

    #[test]
    fn recovery_picks_the_right_directory() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("ftjob-1-step-8");
        let tmp = temp_dir_path(&target).unwrap();
        let aside = aside_dir_path(&target).unwrap();

        // Crashed between the two renames: the old version is aside, a complete new one still
        // under the temporary name. The old one comes back; the unconfirmed new one goes.
        std::fs::create_dir(&aside).unwrap();
        fill("old")(&aside).unwrap();
        std::fs::create_dir(&tmp).unwrap();
        fill("new")(&tmp).unwrap();
        assert_eq!(recover(dir.path()).unwrap(), 2);
        assert_eq!(names(dir.path()), ["ftjob-1-step-8"]);
        assert_eq!(contents(&target), version("old"));

        // Crashed after the new one was renamed in, before the old one was deleted.
        std::fs::remove_dir_all(&target).unwrap();
        std::fs::create_dir(&target).unwrap();
        fill("new")(&target).unwrap();
        std::fs::create_dir(&aside).unwrap();
        fill("old")(&aside).unwrap();
        recover_dir(&target).unwrap();
        assert_eq!(names(dir.path()), ["ftjob-1-step-8"]);
        assert_eq!(contents(&target), version("new"));

        // Crashed while writing the next one: a partial temporary beside the complete current one.
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("a.json"), "ha").unwrap();
        assert_eq!(recover(dir.path()).unwrap(), 1);
        assert_eq!(names(dir.path()), ["ftjob-1-step-8"]);
        assert_eq!(contents(&target), version("new"));

        // The next publish recovers the same leftovers itself (`rewind train` has no start-up
        // scan).
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("a.json"), "ha").unwrap();
        std::fs::create_dir(&aside).unwrap();
        publish_dir(&target, fill("newer")).unwrap();
        assert_eq!(names(dir.path()), ["ftjob-1-step-8"]);
        assert_eq!(contents(&target), version("newer"));
    }

    #[test]
    fn remove_dir_removes_the_whole_directory_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("ftjob-2");
        publish_dir(&target, fill("v")).unwrap();
        remove_dir(&target).unwrap();
        assert!(names(dir.path()).is_empty());
        remove_dir(&target).unwrap(); // already gone: fine

        // A crash mid-deletion leaves only a temporary name, which recovery removes.
        publish_dir(&target, fill("v")).unwrap();
        let doomed = dir.path().join(temp_file_name(&target).unwrap());
        std::fs::rename(&target, &doomed).unwrap();
        std::fs::remove_file(doomed.join("a.json")).unwrap();
        assert_eq!(recover(dir.path()).unwrap(), 1);
        assert!(names(dir.path()).is_empty());
    }
}
