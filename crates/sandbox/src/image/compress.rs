//! Compression of layers and archives, detected by magic bytes (media types lie too often: docker
//! archives call gzip layers `.tar`, registries mislabel zstd).

use std::fmt;
use std::io::{self, BufRead, Read};

use super::ImageError;

/// How a tar stream is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];
const BZIP2_MAGIC: &[u8] = b"BZh";

/// Looks at the first bytes of `input` without consuming them. `what` names the stream in errors.
pub(crate) fn detect<R: BufRead>(input: &mut R, what: &str) -> Result<Compression, ImageError> {
    // One fill_buf is enough: our inputs are files and decompressors, whose first read returns
    // far more than a magic number.
    let head = input.fill_buf().map_err(|source| ImageError::Read { what: what.to_owned(), source })?;
    if head.starts_with(GZIP_MAGIC) {
        Ok(Compression::Gzip)
    } else if head.starts_with(ZSTD_MAGIC) {
        Ok(Compression::Zstd)
    } else if head.starts_with(XZ_MAGIC) || head.starts_with(BZIP2_MAGIC) {
        Err(ImageError::UnsupportedCompression {
            what: what.to_owned(),
            compression: if head.starts_with(XZ_MAGIC) { "xz" } else { "bzip2" },
        })
    } else {
        Ok(Compression::None)
    }
}

/// Wraps `input` so that reads return the decompressed stream.
pub(crate) fn decompressor<'a, R: BufRead + 'a>(input: R, compression: Compression) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(input),
        // Multi-member gzip (pigz, concatenated streams) is valid for layers.
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(input)?),
    })
}
