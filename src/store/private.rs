//! The state folder holds every webhook body the relay received: only its owner reads it.
//!
//! The folder is created `0700` and the files in it `0600`, whatever the umask. The
//! database file is created here, before SQLite opens it, because SQLite gives its `-wal`
//! and `-shm` files the database file's mode. A folder that already exists keeps its
//! mode (an operator may have chosen it) but gets a warning when others can read it.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Files only the owner reads and writes.
pub const FILE_MODE: u32 = 0o600;
/// A folder only the owner enters.
pub const FOLDER_MODE: u32 = 0o700;

/// Creates the state folder (`0700`) and the store file (`0600`) if missing, and makes
/// every file already in the folder `0600`.
pub fn prepare_state_folder(folder: &Path, store: &Path) -> std::io::Result<()> {
    if folder.exists() {
        let mode = std::fs::metadata(folder)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                folder = %folder.display(),
                mode = format!("{mode:o}"),
                "the state folder can be read by others; it holds webhook bodies: chmod 700 it"
            );
        }
    } else {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(FOLDER_MODE)
            .create(folder)?;
        // `mode` is filtered by the umask; say it once more, exactly.
        std::fs::set_permissions(folder, std::fs::Permissions::from_mode(FOLDER_MODE))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(store)?;
    for entry in std::fs::read_dir(folder)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let mode = entry.metadata()?.permissions().mode() & 0o777;
            if mode != FILE_MODE {
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(FILE_MODE))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folder_and_its_files_are_private_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("state");
        let store = folder.join("hookrelay.sqlite3");
        prepare_state_folder(&folder, &store).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&folder), FOLDER_MODE);
        assert_eq!(mode(&store), FILE_MODE);
        // A file left readable by an earlier release is made private.
        let wal = folder.join("hookrelay.sqlite3-wal");
        std::fs::write(&wal, b"").unwrap();
        std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o644)).unwrap();
        prepare_state_folder(&folder, &store).unwrap();
        assert_eq!(mode(&wal), FILE_MODE);
    }
}
