//! One process per data directory: `rewind serve` holds an exclusive advisory lock (flock(2))
//! on `<data_dir>/rewind.lock` for as long as it serves. The embedded SQLite database, the model
//! registry and the file blobs assume a single writer; a second server on the same directory
//! would interleave its writes with the first's, so it refuses to start instead.
//!
//! The kernel drops a flock when the last descriptor of the open file goes away, so the lock is
//! released when the process dies however it dies (`kill -9` included): a stale lock file never
//! blocks a restart. The holder writes its pid into the file so the refusal can name it.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The lock file's name under the data directory.
pub const LOCK_FILE: &str = "rewind.lock";

/// How long to wait for a server of this same process that is still stopping (a restart in the
/// same process, as tests do) to let go of the directory.
const SAME_PROCESS_WAIT: Duration = Duration::from_secs(15);

/// The held lock; dropping it (or the process ending) releases the data directory.
#[derive(Debug)]
pub struct DataDirLock {
    /// Open while held (closing it releases the flock).
    file: Option<File>,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the data directory `data_dir` (created if needed) for this process, or fails at once,
    /// naming the directory and the pid holding it, when another process has it.
    pub fn acquire(data_dir: &Path) -> Result<Self> {
        crate::durable::create_dir_all(data_dir)?;
        let path = data_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let started = Instant::now();
        loop {
            match try_lock(&file) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("locking {}", path.display()));
                }
            }
            let holder = holder_pid(&mut file);
            // Held by this process, or just released by it while a short-lived child forked
            // from it (the CPU kernels' start-up probe) still shares the descriptor: wait.
            let ours = held_here(&path) || holder == Some(std::process::id());
            if ours && started.elapsed() < SAME_PROCESS_WAIT {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let who = match holder {
                Some(pid) => format!("pid {pid}"),
                None => "pid unknown".to_string(),
            };
            bail!(
                "the data directory {dir} is in use by another rewind process ({who}), which holds \
                 the lock {lock}. Stop that process, or give this one its own data directory \
                 (`data_dir`, `--data-dir` or REWIND_DATA_DIR). rewind keeps its state in an embedded \
                 SQLite database that one process owns; several processes serving the same state \
                 would need a shared database server instead of the embedded SQLite",
                dir = data_dir.display(),
                lock = path.display(),
            );
        }
        // Ours now: record who holds it (the pid, for the message another process gives; and in
        // this process, the path: two containers sharing a volume can both be pid 1).
        held_paths().push(canonical(&path));
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.sync_data())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self {
            file: Some(file),
            path,
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        // Released first, so a server of this process waiting for it never finds it held by
        // nobody it knows.
        drop(self.file.take());
        let path = canonical(&self.path);
        held_paths().retain(|p| *p != path);
    }
}

/// Lock files this process holds.
static HELD: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn held_paths() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// Whether a server of this very process holds the lock file (it is still stopping).
fn held_here(path: &Path) -> bool {
    held_paths().contains(&canonical(path))
}

/// The pid recorded in the lock file (None while the holder has not written it yet).
fn holder_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// flock(LOCK_EX | LOCK_NB): Ok(false) when another open file description holds it.
#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a descriptor this `File` owns and keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(code) if code == libc::EWOULDBLOCK || code == libc::EAGAIN => return Ok(false),
            _ => return Err(error),
        }
    }
}

#[cfg(not(unix))]
fn try_lock(file: &File) -> std::io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// flock locks belong to open file descriptions, so a second open in the same process
    /// conflicts like another process would; the pid check then sees its own pid and waits. Here
    /// the pid written is another's, as a second process would find it.
    #[test]
    fn a_second_holder_is_refused_and_the_lock_is_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DataDirLock::acquire(dir.path()).unwrap();
        let path = dir.path().join(LOCK_FILE);
        assert_eq!(lock.path(), path);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            std::process::id().to_string()
        );
        // Pretend another process holds it (the pid file says so; the flock is real).
        std::fs::write(&path, "4242\n").unwrap();
        let refused = DataDirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            refused.contains(&dir.path().display().to_string()),
            "{refused}"
        );
        assert!(refused.contains("pid 4242"), "{refused}");
        assert!(refused.contains("shared database server"), "{refused}");

        drop(lock);
        let again = DataDirLock::acquire(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            std::process::id().to_string()
        );
        drop(again);
    }

    /// A server of this process that is still stopping is waited for, not refused.
    #[test]
    fn a_holder_in_this_process_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DataDirLock::acquire(dir.path()).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(lock);
        });
        let started = Instant::now();
        let again = DataDirLock::acquire(dir.path()).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
        release.join().unwrap();
        drop(again);
    }
}
