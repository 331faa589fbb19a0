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
/// every file already in the folder `0600`. The error says which step failed and on what
/// path, since "permission denied" alone does not tell an operator where to look.
pub fn prepare_state_folder(folder: &Path, store: &Path) -> Result<(), String> {
    let shown = folder.display();
    match std::fs::metadata(folder) {
        Ok(meta) if !meta.is_dir() => {
            return Err(format!(
                "the state folder {shown} is a file, not a folder; give --state a folder (it is created if missing)"
            ));
        }
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    folder = %shown,
                    mode = format!("{mode:o}"),
                    "the state folder can be read by others; it holds webhook bodies: chmod 700 it"
                );
            }
        }
        // Missing, or under a file: creating it says which.
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(FOLDER_MODE)
                .create(folder)
                .map_err(|err| format!("cannot create the state folder {shown}: {err}"))?;
            // `mode` is filtered by the umask; say it once more, exactly.
            std::fs::set_permissions(folder, std::fs::Permissions::from_mode(FOLDER_MODE))
                .map_err(|err| format!("cannot make the state folder {shown} private: {err}"))?;
        }
        Err(err) => return Err(format!("cannot read the state folder {shown}: {err}")),
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(store)
        .map_err(|err| {
            format!(
                "cannot open {} for writing: {err} (the relay needs to write in its state folder)",
                store.display()
            )
        })?;
    let listing_failed =
        |err: std::io::Error| format!("cannot list the state folder {shown}: {err}");
    for entry in std::fs::read_dir(folder).map_err(listing_failed)? {
        let entry = entry.map_err(listing_failed)?;
        let path = entry.path();
        let is_file = entry
            .file_type()
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?
            .is_file();
        if !is_file {
            continue;
        }
        let mode = entry
            .metadata()
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?
            .permissions()
            .mode()
            & 0o777;
        if mode != FILE_MODE {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(FILE_MODE))
                .map_err(|err| format!("cannot make {} private: {err}", path.display()))?;
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

    #[test]
    fn a_state_path_that_is_a_file_or_cannot_be_created_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state");
        std::fs::write(&file, b"").unwrap();
        let err = prepare_state_folder(&file, &file.join("hookrelay.sqlite3")).unwrap_err();
        assert!(err.contains("is a file, not a folder"), "{err}");
        let under_a_file = file.join("inner");
        let err = prepare_state_folder(&under_a_file, &under_a_file.join("hookrelay.sqlite3"))
            .unwrap_err();
        assert!(err.starts_with("cannot create the state folder"), "{err}");
    }
}
