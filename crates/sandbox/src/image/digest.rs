//! SHA-256 content digests and readers that compute them while data streams through.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use super::ImageError;

/// A validated content digest, written `sha256:<64 lowercase hex>` (the only algorithm OCI images use
/// in practice; others are refused with a clear error).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(Sha256::digest(bytes).into())
    }

    /// Parses the 64 lowercase hex digits of a SHA-256 digest (without the `sha256:` prefix).
    pub fn from_hex(hex: &str) -> Result<Self, ImageError> {
        let invalid = || ImageError::InvalidDigest { value: hex.to_owned() };
        // Uppercase would make two names for one layer directory.
        if hex.len() != 64 || hex.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid());
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex, &mut bytes).map_err(|_| invalid())?;
        Ok(Digest(bytes))
    }

    /// The 64 lowercase hex digits (the name of the layer's directory).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Digest {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, ImageError> {
        match s.split_once(':') {
            Some(("sha256", hex)) => Digest::from_hex(hex),
            _ => Err(ImageError::InvalidDigest { value: s.to_owned() }),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hash state fed by a [`HashingReader`]; read the result after the reader is dropped.
#[derive(Default)]
pub(crate) struct HashState {
    hasher: Sha256,
    bytes: u64,
}

impl HashState {
    /// The digest and length of everything read so far.
    pub(crate) fn finish(self) -> (Digest, u64) {
        (Digest(self.hasher.finalize().into()), self.bytes)
    }
}

/// Passes reads through and hashes them into a [`HashState`] it borrows.
pub(crate) struct HashingReader<'s, R> {
    inner: R,
    state: &'s mut HashState,
}

impl<'s, R: Read> HashingReader<'s, R> {
    pub(crate) fn new(inner: R, state: &'s mut HashState) -> Self {
        HashingReader { inner, state }
    }
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.state.hasher.update(&buf[..n]);
        self.state.bytes += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_sha256() {
        let d = Digest::of(b"");
        let s = d.to_string();
        assert_eq!(s, "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(s.parse::<Digest>().unwrap(), d);
        assert_eq!(serde_json::from_str::<Digest>(&serde_json::to_string(&d).unwrap()).unwrap(), d);
    }

    #[test]
    fn refuses_malformed_digests() {
        let hex = Digest::of(b"x").hex();
        for bad in [
            format!("sha512:{hex}"),
            hex.clone(),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha256:{}g", &hex[1..]),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn hashing_reader_counts_and_hashes() {
        let mut state = HashState::default();
        let mut out = Vec::new();
        HashingReader::new(&b"hello"[..], &mut state).read_to_end(&mut out).unwrap();
        assert_eq!(state.finish(), (Digest::of(b"hello"), 5));
    }
}
