//! One relay per state folder: an exclusive lock on `hookrelay.lock` inside it.
//!
//! The lock is the kernel's (`flock`), so it goes when the process goes, `kill -9`
//! included: a crash never leaves a stale lock behind. The file also says who holds it
//! (process id, start time, listen address) so a second relay can name the first.
//! Commands that read or replay beside a running relay (`deliveries`, `replay`) do not
//! take it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The lock file's name inside the state folder.
pub const LOCK_FILE: &str = "hookrelay.lock";

/// Held while the relay runs; dropping it releases the folder.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    /// The store file, locked the same way: a lock file deleted as "stale" under a
    /// running relay (a new one then locks at once) does not let a second relay onto the
    /// store, whose in-flight sends it would take back and send again.
    _store: Option<File>,
    pub path: PathBuf,
}

/// Why the folder could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another hookrelay is already using the state folder {folder} ({holder}); \
         stop it first, or give this one its own --state"
    )]
    Held { folder: String, holder: String },
    #[error("cannot lock {path}: {reason}")]
    Io { path: String, reason: String },
}

impl LockError {
    fn io(path: &Path, err: std::io::Error) -> LockError {
        LockError::Io {
            path: path.display().to_string(),
            reason: err.to_string(),
        }
    }
}

/// Takes the state folder's lock, or says which process holds it. `holder` is written
/// into the file for the next one to read (e.g. `pid 42, listening on 127.0.0.1:8080`).
pub fn lock_state_folder(folder: &Path, holder: &str) -> Result<StateLock, LockError> {
    let path = folder.join(LOCK_FILE);
    let io = |err| LockError::io(&path, err);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(super::private::FILE_MODE)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = text.trim();
            return Err(LockError::Held {
                folder: folder.display().to_string(),
                holder: if holder.is_empty() {
                    "a process that has not said who it is yet".into()
                } else {
                    holder.to_owned()
                },
            });
        }
        Err(TryLockError::Error(err)) => return Err(io(err)),
    }
    let store = lock_store_file(folder)?;
    file.set_len(0).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.write_all(format!("{holder}\n").as_bytes())
        .map_err(io)?;
    Ok(StateLock {
        _file: file,
        _store: store,
        path,
    })
}

/// Locks the folder's store file, when there is one yet.
fn lock_store_file(folder: &Path) -> Result<Option<File>, LockError> {
    let path = folder.join(super::sqlite::STORE_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(LockError::io(&path, err)),
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Err(LockError::Held {
            folder: folder.display().to_string(),
            holder: format!(
                "it holds the store file {} although {LOCK_FILE} was deleted and made anew",
                path.display()
            ),
        }),
        Err(TryLockError::Error(err)) => Err(LockError::io(&path, err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_first_and_a_released_lock_is_free_again() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_state_folder(dir.path(), "pid 1, listening on 127.0.0.1:8080").unwrap();
        let err = lock_state_folder(dir.path(), "pid 2")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pid 1, listening on 127.0.0.1:8080"), "{err}");
        assert!(err.contains("another hookrelay"), "{err}");
        drop(first);
        let again = lock_state_folder(dir.path(), "pid 3").unwrap();
        assert_eq!(
            std::fs::read_to_string(&again.path).unwrap().trim(),
            "pid 3"
        );
    }

    /// "A stale lock file": deleted under a running relay, a new one locks at once. The
    /// store file's lock still keeps a second relay off the store.
    #[test]
    fn a_deleted_lock_file_does_not_let_a_second_relay_onto_the_store() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(super::super::sqlite::STORE_FILE), b"").unwrap();
        let first = lock_state_folder(dir.path(), "pid 1").unwrap();
        std::fs::remove_file(&first.path).unwrap();
        let err = lock_state_folder(dir.path(), "pid 2")
            .unwrap_err()
            .to_string();
        assert!(err.contains("another hookrelay"), "{err}");
        assert!(err.contains("hookrelay.lock was deleted"), "{err}");
        drop(first);
        lock_state_folder(dir.path(), "pid 3").unwrap();
    }
}
