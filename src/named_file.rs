//! Files an operator names (configuration, secrets, certificates and keys, payloads),
//! read with a bound. A path that names `/dev/zero`, a log file or a disk image by mistake
//! is refused with what was expected, instead of taking all of the relay's memory (at a
//! reload, the running relay's). Each kind of file has its own bound, far above any real
//! one of its kind.

use std::io::{self, Read};
use std::path::Path;

/// What a file is read as: its name in messages and the most bytes one may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    pub name: &'static str,
    pub most: u64,
}

/// A secret (`file:PATH`): a token, a signing secret, a GitHub App's private key (about
/// 1.7 KB of PEM).
pub const SECRET: Kind = Kind {
    name: "secret",
    most: 64 * 1024,
};

/// A PEM file of certificates (a CA bundle: every root Mozilla trusts is about 220 KB),
/// or a private key.
pub const PEM: Kind = Kind {
    name: "PEM file",
    most: 8 * 1024 * 1024,
};

/// A configuration file.
pub const CONFIGURATION: Kind = Kind {
    name: "configuration file",
    most: 16 * 1024 * 1024,
};

/// A webhook payload to explain offline (a relay takes bodies of at most 25 MiB by
/// default, `[server] max_body`).
pub const PAYLOAD: Kind = Kind {
    name: "webhook payload",
    most: 256 * 1024 * 1024,
};

/// Reads `path` whole; one larger than `kind.most` is an error of kind
/// [`io::ErrorKind::FileTooLarge`] that says so, read no further than that.
pub fn read(path: &Path, kind: Kind) -> io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    // A regular file says its size, so the common mistake costs no read at all.
    if let Ok(meta) = file.metadata()
        && meta.is_file()
        && meta.len() > kind.most
    {
        return Err(too_large(kind));
    }
    let mut bytes = Vec::new();
    file.take(kind.most + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > kind.most {
        return Err(too_large(kind));
    }
    Ok(bytes)
}

/// [`read`], as UTF-8 text.
pub fn read_text(path: &Path, kind: Kind) -> io::Result<String> {
    String::from_utf8(read(path, kind)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "it is not UTF-8 text"))
}

fn too_large(kind: Kind) -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        format!(
            "larger than {}, more than any {} holds: is it the right file?",
            size(kind.most),
            kind.name
        ),
    )
}

/// `64 KiB`, `16 MiB`.
fn size(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} bytes"),
        1024..1_048_576 => format!("{} KiB", bytes / 1024),
        _ => format!("{} MiB", bytes / 1_048_576),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: Kind = Kind {
        name: "secret",
        most: 8,
    };

    #[test]
    fn a_file_within_its_bound_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, b"12345678").unwrap();
        assert_eq!(read(&path, TINY).unwrap(), b"12345678");
        assert_eq!(read_text(&path, TINY).unwrap(), "12345678");
    }

    #[test]
    fn a_regular_file_past_its_bound_is_refused_by_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, b"123456789").unwrap();
        let err = read(&path, TINY).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        assert_eq!(
            err.to_string(),
            "larger than 8 bytes, more than any secret holds: is it the right file?"
        );
    }

    /// `/dev/zero` never ends and says no size: the read stops at the bound.
    #[test]
    fn an_endless_device_is_read_no_further_than_the_bound() {
        let err = read(Path::new("/dev/zero"), SECRET).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        assert!(err.to_string().contains("64 KiB"), "{err}");
        let err = read_text(Path::new("/dev/zero"), CONFIGURATION).unwrap_err();
        assert!(err.to_string().contains("16 MiB"), "{err}");
    }

    #[test]
    fn text_that_is_not_utf8_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        let err = read_text(&path, CONFIGURATION).unwrap_err();
        assert_eq!(err.to_string(), "it is not UTF-8 text");
    }
}
