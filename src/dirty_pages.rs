//! Starting the kernel's write-back of a file's dirty pages early, without waiting for it.
//!
//! Why: Linux keeps written pages in memory until they are 30 seconds old (or a tenth of
//! memory is dirty) and then writes them all at once; a flush that the store needs meanwhile
//! (a group commit's `fsync`, SQLite's or PostgreSQL's on the same disk) waits behind that
//! burst. Starting write-back as the pages are written spreads the same writes out.
//! [`crate::store::write_back`] does it for the SQLite file while a checkpoint copies into
//! it, [`crate::log_writer`] for a log written to a file.
//!
//! The crate's one `unsafe`: `sync_file_range(2)`, which no safe wrapper in our
//! dependencies offers, on a descriptor the caller keeps open.
#![allow(unsafe_code)]

use std::os::fd::AsFd;
use std::os::fd::AsRawFd;

/// `sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)`: starts writing every dirty page of
/// the file without waiting for any to reach the disk.
pub fn start_writing(file: &impl AsFd) -> std::io::Result<()> {
    // SAFETY: the descriptor is borrowed, so open for the call, and the call reads and
    // writes no memory of ours.
    let result = unsafe {
        libc::sync_file_range(file.as_fd().as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_back_starts_on_a_file_and_is_refused_on_a_pipe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        start_writing(&std::fs::File::open(&path).unwrap()).unwrap();
        let (reader, _writer) = std::io::pipe().unwrap();
        let refused = start_writing(&reader).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::ESPIPE), "{refused}");
    }
}
