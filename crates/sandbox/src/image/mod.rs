//! The image store: a content-addressed store of extracted layers, and the importer that fills it
//! from OCI image layouts (directories or tars), `docker save` archives, and plain rootfs
//! directories or tarballs. See `docs/images.md` for the on-disk layout and the formats.
//!
//! The daemon keeps image names and what [`LayerStore::import`] returned in its catalog; this store
//! only holds layers, one directory per diff_id, in kernel-overlayfs lower-layer format.

mod bundle;
mod compress;
mod digest;
mod dir_tar;
mod extract;
mod manifest;

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, RenameFlags};
use serde::{Deserialize, Serialize};

use bundle::{Bundle, DirBundle, TarBundle};
use compress::Compression;
pub use digest::Digest;
use digest::{HashState, HashingReader};

/// Errors of the image store and importer.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid digest {value:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest { value: String },
    #[error("{}: no such file or directory", path.display())]
    SourceNotFound { path: PathBuf },
    #[error(
        "{}: a reference (:{reference}) selects an image of an OCI layout or docker archive, \
         but this is a plain rootfs", path.display()
    )]
    ReferenceOnRootfs { path: PathBuf, reference: String },
    #[error("cannot read {what}")]
    Read {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("image store: {what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} is compressed with {compression}; only tar, tar+gzip and tar+zstd are supported")]
    UnsupportedCompression { what: String, compression: &'static str },
    #[error("{}: not a valid image: {message}", source_path.display())]
    BadImage { source_path: PathBuf, message: String },
    #[error("{what} is not a valid OCI document")]
    OciJson {
        what: String,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch { what: String, expected: Digest, actual: Digest },
    #[error("layer entry {entry:?} refused: {reason}")]
    UnsafeEntry { entry: String, reason: &'static str },
    #[error("cannot extract layer entry {entry:?}")]
    Extract {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("layer entry {entry:?} has a type we cannot extract ({kind})")]
    UnsupportedEntry { entry: String, kind: String },
    #[error("the layer is not a valid tar stream")]
    Tar {
        #[source]
        source: io::Error,
    },
    #[error("cannot import layer {layer}")]
    Layer {
        layer: String,
        #[source]
        source: Box<ImageError>,
    },
    #[error("layer {diff_id} is not in the store")]
    LayerNotFound { diff_id: Digest },
}

impl ImageError {
    fn tar(source: io::Error) -> Self {
        ImageError::Tar { source }
    }

    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
        let what = what.into();
        move |source| ImageError::Io { what, source }
    }
}

/// The image's runtime defaults, from its config (empty for a plain rootfs: the daemon applies its
/// own defaults, e.g. a PATH, where the image has none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// One layer of an imported image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// SHA-256 of the uncompressed layer tar; names the layer's directory.
    pub diff_id: Digest,
    /// Length of the uncompressed layer tar in bytes.
    pub size: u64,
}

/// What an import found at its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// An OCI image layout directory.
    OciLayout,
    /// An OCI image layout in a tar file.
    OciArchive,
    /// A `docker save` tar file (older ones without an OCI layout inside).
    DockerArchive,
    /// An unpacked `docker save` archive.
    DockerDir,
    /// A plain root filesystem directory, imported as one layer.
    RootfsDir,
    /// A plain root filesystem tarball, imported as one layer.
    RootfsTar,
}

/// The result of [`LayerStore::import`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedImage {
    /// Bottom layer first, as overlayfs stacks them last.
    pub layers: Vec<LayerInfo>,
    pub config: ImageConfig,
    pub format: SourceFormat,
}

/// What an import is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportStage {
    /// Decompressing a compressed archive into the store's tmp/ (bytes: of the compressed file).
    Decompressing,
    /// Importing layer `index` of `count` (bytes: of all layer blobs, compressed, layers already in
    /// the store counting as read).
    Layer { index: usize, count: usize },
}

/// Progress of an import, reported at least every MiB read and at each layer boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub stage: ImportStage,
    pub done_bytes: u64,
    /// 0 when unknown (a rootfs directory is streamed without being measured first).
    pub total_bytes: u64,
}

const REPORT_EVERY: u64 = 1 << 20;
const READ_BUFFER: usize = 256 * 1024;

/// The sidecar `layers/<hex>.json` of a layer (written before the layer appears).
#[derive(Serialize, Deserialize)]
struct LayerMeta {
    diff_id: Digest,
    size: u64,
}

/// A content-addressed store of extracted layers, rooted at `<data-dir>/images`:
/// `layers/<hex>/` (one extracted layer per diff_id), `layers/<hex>.json` (its size), `tmp/` (imports
/// in progress).
pub struct LayerStore {
    layers: PathBuf,
    tmp: PathBuf,
}

impl LayerStore {
    /// Opens (creating) the store at `root` and removes what crashed imports left in tmp/.
    /// `root` is made mode 0700: layers hold setuid binaries and device nodes of images, which no
    /// unprivileged host user may reach.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        let store = LayerStore { layers: root.join("layers"), tmp: root.join("tmp") };
        for dir in [&store.layers, &store.tmp] {
            fs::create_dir_all(dir).map_err(ImageError::io(format!("creating {}", dir.display())))?;
        }
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))
            .map_err(ImageError::io(format!("chmod {}", root.display())))?;
        store.remove_stale_tmp()?;
        store.remove_orphan_meta()?;
        Ok(store)
    }

    /// The directory of layer `diff_id` (it exists once an import that returned it has finished).
    pub fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.layers.join(diff_id.hex())
    }

    /// Every layer in the store, sorted (for garbage collection by the daemon).
    pub fn layers(&self) -> Result<Vec<Digest>, ImageError> {
        let what = format!("listing {}", self.layers.display());
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.layers).map_err(ImageError::io(what.clone()))? {
            let entry = entry.map_err(ImageError::io(what.clone()))?;
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            match entry.file_name().to_str().map(Digest::from_hex) {
                Some(Ok(digest)) if is_dir => out.push(digest),
                _ if !is_dir => {}
                _ => {
                    tracing::warn!(name = ?entry.file_name(), "unexpected directory in layer store");
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes layer `diff_id`. It disappears atomically (renamed into tmp/ first), so a crash
    /// never leaves part of it visible.
    pub fn remove_layer(&self, diff_id: &Digest) -> Result<(), ImageError> {
        let work = WorkDir::new(&self.tmp)?;
        match fs::rename(self.layer_path(diff_id), work.path().join("removed")) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::LayerNotFound { diff_id: *diff_id })
            }
            other => other.map_err(ImageError::io(format!("removing layer {diff_id}")))?,
        }
        match fs::remove_file(self.meta_path(diff_id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(ImageError::io(format!("removing layer {diff_id}"))(e))
            }
            _ => {}
        }
        work.remove()
    }

    /// Imports the image at `source` and returns its layers (bottom first) and config.
    ///
    /// `source` is an OCI image layout directory, an OCI layout or `docker save` tar file, a plain
    /// rootfs directory, or a plain rootfs tarball (tar files may be gzip or zstd compressed).
    /// `PATH:REF` selects the image tagged REF in a layout/archive that holds several. Layers
    /// already in the store are not read again.
    pub fn import(&self, source: &Path, progress: &mut dyn FnMut(Progress)) -> Result<ImportedImage, ImageError> {
        let (path, reference) = split_reference(source)?;
        let work = WorkDir::new(&self.tmp)?;
        let metadata =
            fs::metadata(&path).map_err(|source| ImageError::Read { what: path.display().to_string(), source })?;
        let imported = if metadata.is_dir() {
            let bundle = DirBundle::open_dir(&path)?;
            match detect_bundle(&bundle)? {
                Some(kind) => self.import_bundle(&bundle, kind, false, reference, &work, progress)?,
                None => {
                    refuse_reference(&path, reference)?;
                    self.import_rootfs_dir(&path, &work, progress)?
                }
            }
        } else {
            let file =
                File::open(&path).map_err(|source| ImageError::Read { what: path.display().to_string(), source })?;
            let file = decompress_archive(file, &path, &work, progress)?;
            let bundle = TarBundle::index(file, &path)?;
            match detect_bundle(&bundle)? {
                Some(kind) => self.import_bundle(&bundle, kind, true, reference, &work, progress)?,
                None => {
                    refuse_reference(&path, reference)?;
                    self.import_rootfs_tar(bundle.into_file(), &path, &work, progress)?
                }
            }
        };
        work.remove()?;
        Ok(imported)
    }

    /// Imports the image of an OCI layout or docker archive; `archive` tells a tar file from a
    /// directory (for [`SourceFormat`]).
    fn import_bundle(
        &self,
        bundle: &dyn Bundle,
        kind: BundleKind,
        archive: bool,
        reference: Option<String>,
        work: &WorkDir,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ImportedImage, ImageError> {
        let (plan, format) = match kind {
            BundleKind::Oci => (
                manifest::plan_oci(bundle, reference.as_deref())?,
                if archive { SourceFormat::OciArchive } else { SourceFormat::OciLayout },
            ),
            BundleKind::Docker(images) => (
                manifest::plan_docker(bundle, &images, reference.as_deref())?,
                if archive { SourceFormat::DockerArchive } else { SourceFormat::DockerDir },
            ),
        };
        let total: u64 = plan.layers.iter().map(|l| l.size).sum();
        let count = plan.layers.len();
        let mut done = 0;
        let mut layers = Vec::with_capacity(count);
        for (index, layer) in plan.layers.iter().enumerate() {
            let stage = ImportStage::Layer { index, count };
            progress(Progress { stage, done_bytes: done, total_bytes: total });
            let info = match self.existing_layer(&layer.diff_id) {
                Some(info) => {
                    tracing::debug!(diff_id = %layer.diff_id, "layer already in the store");
                    info
                }
                None => {
                    let what = bundle.describe(&layer.blob);
                    let wrap = |e| ImageError::Layer { layer: what.clone(), source: Box::new(e) };
                    let (reader, size) = bundle.open(&layer.blob)?;
                    if size != layer.size {
                        return Err(wrap(ImageError::BadImage {
                            source_path: bundle.path().to_owned(),
                            message: format!("{} is {size} bytes, its descriptor says {}", layer.blob, layer.size),
                        }));
                    }
                    let reader = ProgressReader::new(reader, progress, stage, done, total);
                    let staged = stage_layer(reader, work, &what, layer.blob_digest)
                        .and_then(|staged| staged.verify_diff_id(&what, &layer.diff_id))
                        .map_err(wrap)?;
                    self.commit(staged)?
                }
            };
            done += layer.size;
            layers.push(info);
        }
        progress(Progress {
            stage: ImportStage::Layer { index: count.saturating_sub(1), count },
            done_bytes: total,
            total_bytes: total,
        });
        Ok(ImportedImage { layers, config: plan.config, format })
    }

    fn import_rootfs_tar(
        &self,
        mut file: File,
        path: &Path,
        work: &WorkDir,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ImportedImage, ImageError> {
        let read_err = |source| ImageError::Read { what: path.display().to_string(), source };
        file.rewind().map_err(read_err)?;
        let total = file.metadata().map_err(read_err)?.len();
        let stage = ImportStage::Layer { index: 0, count: 1 };
        let reader = ProgressReader::new(file, progress, stage, 0, total);
        let staged = stage_layer(reader, work, &path.display().to_string(), None)?;
        Ok(ImportedImage {
            layers: vec![self.commit(staged)?],
            config: ImageConfig::default(),
            format: SourceFormat::RootfsTar,
        })
    }

    /// Streams a deterministic tar of `dir` through a pipe into the extractor, so the layer gets a
    /// diff_id like any other and hardlinks and xattrs survive.
    fn import_rootfs_dir(
        &self,
        dir: &Path,
        work: &WorkDir,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ImportedImage, ImageError> {
        let (read_end, write_end) = rustix::pipe::pipe().map_err(|e| ImageError::io("creating a pipe")(e.into()))?;
        // A bigger pipe means fewer context switches between the two threads; best effort.
        let _ = rustix::pipe::fcntl_setpipe_size(&write_end, 1 << 20);
        let what = dir.display().to_string();
        let stage = ImportStage::Layer { index: 0, count: 1 };
        let (staged, written) = std::thread::scope(|scope| {
            let writer = scope.spawn(move || dir_tar::write_dir_tar(dir, File::from(write_end)));
            // The read end is dropped when staging returns, so a failed extraction unblocks the
            // writer (EPIPE) before the scope joins it.
            let reader = ProgressReader::new(File::from(read_end), progress, stage, 0, 0);
            let staged = stage_layer(reader, work, &what, None);
            (staged, writer.join())
        });
        match written {
            Ok(Ok(())) => {}
            Ok(Err(source)) => return Err(ImageError::Read { what, source }),
            Err(panic) => std::panic::resume_unwind(panic),
        }
        Ok(ImportedImage {
            layers: vec![self.commit(staged?)?],
            config: ImageConfig::default(),
            format: SourceFormat::RootfsDir,
        })
    }

    fn meta_path(&self, diff_id: &Digest) -> PathBuf {
        self.layers.join(format!("{}.json", diff_id.hex()))
    }

    /// The layer `diff_id` if it is complete in the store.
    fn existing_layer(&self, diff_id: &Digest) -> Option<LayerInfo> {
        if !self.layer_path(diff_id).is_dir() {
            return None;
        }
        let meta: LayerMeta = serde_json::from_slice(&fs::read(self.meta_path(diff_id)).ok()?).ok()?;
        Some(LayerInfo { diff_id: meta.diff_id, size: meta.size })
    }

    /// Makes a staged layer visible: data synced, sidecar written, then one atomic rename. If a
    /// concurrent import committed the same layer first, ours is dropped (same content).
    fn commit(&self, staged: StagedLayer) -> Result<LayerInfo, ImageError> {
        let diff_id = staged.diff_id;
        let what = format!("committing layer {diff_id}");
        let dir = File::open(&staged.path).map_err(ImageError::io(what.clone()))?;
        rustix::fs::syncfs(&dir).map_err(|e| ImageError::io(what.clone())(e.into()))?;

        let meta = serde_json::to_vec(&LayerMeta { diff_id, size: staged.size }).expect("LayerMeta serializes");
        let meta_tmp = staged.path.with_extension("json");
        fs::write(&meta_tmp, meta).map_err(ImageError::io(what.clone()))?;
        File::open(&meta_tmp).and_then(|f| f.sync_all()).map_err(ImageError::io(what.clone()))?;
        fs::rename(&meta_tmp, self.meta_path(&diff_id)).map_err(ImageError::io(what.clone()))?;

        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staged.path,
            rustix::fs::CWD,
            self.layer_path(&diff_id),
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => {
                tracing::debug!(%diff_id, "layer committed concurrently by another import");
            }
            Err(e) => return Err(ImageError::io(what)(e.into())),
        }
        File::open(&self.layers)
            .and_then(|d| d.sync_all())
            .map_err(ImageError::io(format!("syncing {}", self.layers.display())))?;
        Ok(LayerInfo { diff_id, size: staged.size })
    }

    /// Removes what crashed imports left in tmp/. Work directories of running imports are locked
    /// and kept.
    fn remove_stale_tmp(&self) -> Result<(), ImageError> {
        let what = format!("cleaning {}", self.tmp.display());
        for entry in fs::read_dir(&self.tmp).map_err(ImageError::io(what.clone()))? {
            let path = entry.map_err(ImageError::io(what.clone()))?.path();
            if !path.is_dir() || path.is_symlink() {
                fs::remove_file(&path).map_err(ImageError::io(what.clone()))?;
                continue;
            }
            let dir = File::open(&path).map_err(ImageError::io(what.clone()))?;
            if rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive).is_err() {
                tracing::debug!(path = %path.display(), "import in progress; keeping its tmp dir");
                continue;
            }
            tracing::info!(path = %path.display(), "removing leftover of an interrupted import");
            fs::remove_dir_all(&path).map_err(ImageError::io(what.clone()))?;
        }
        Ok(())
    }

    /// Removes sidecars whose layer is gone (a crash during commit or removal).
    fn remove_orphan_meta(&self) -> Result<(), ImageError> {
        let what = format!("cleaning {}", self.layers.display());
        for entry in fs::read_dir(&self.layers).map_err(ImageError::io(what.clone()))? {
            let path = entry.map_err(ImageError::io(what.clone()))?.path();
            if path.extension().is_some_and(|e| e == "json") && !path.with_extension("").is_dir() {
                fs::remove_file(&path).map_err(ImageError::io(what.clone()))?;
            }
        }
        Ok(())
    }
}

enum BundleKind {
    Oci,
    Docker(Vec<manifest::DockerImage>),
}

/// An OCI layout (it has `oci-layout`; newer docker archives have both) or a docker archive (a
/// `manifest.json` in docker's format); `None` for a plain rootfs.
fn detect_bundle(bundle: &dyn Bundle) -> Result<Option<BundleKind>, ImageError> {
    if bundle.contains("oci-layout") {
        return Ok(Some(BundleKind::Oci));
    }
    if bundle.contains("manifest.json") {
        if let Some(images) = manifest::parse_docker_manifest(&bundle.read_small("manifest.json")?) {
            return Ok(Some(BundleKind::Docker(images)));
        }
    }
    Ok(None)
}

/// `source` itself if it exists, else the shortest existing path before a `:`, with the rest as the
/// reference (`layout:latest`, `save.tar:busybox:1.36`).
fn split_reference(source: &Path) -> Result<(PathBuf, Option<String>), ImageError> {
    if source.exists() {
        return Ok((source.to_owned(), None));
    }
    let bytes = source.as_os_str().as_bytes();
    for (i, _) in bytes.iter().enumerate().filter(|(_, b)| **b == b':') {
        let path = Path::new(std::ffi::OsStr::from_bytes(&bytes[..i]));
        let reference = String::from_utf8_lossy(&bytes[i + 1..]).into_owned();
        if !reference.is_empty() && path.exists() {
            return Ok((path.to_owned(), Some(reference)));
        }
    }
    Err(ImageError::SourceNotFound { path: source.to_owned() })
}

fn refuse_reference(path: &Path, reference: Option<String>) -> Result<(), ImageError> {
    match reference {
        Some(reference) => Err(ImageError::ReferenceOnRootfs { path: path.to_owned(), reference }),
        None => Ok(()),
    }
}

/// A compressed tar file is decompressed into the work directory (an image archive must be read in
/// place by offsets, and whether it is one shows only in its entries); an uncompressed one is used
/// as it is.
fn decompress_archive(
    file: File,
    path: &Path,
    work: &WorkDir,
    progress: &mut dyn FnMut(Progress),
) -> Result<File, ImageError> {
    let what = path.display().to_string();
    let read_err = |source| ImageError::Read { what: what.clone(), source };
    let mut head = BufReader::new(file);
    let compression = compress::detect(&mut head, &what)?;
    let mut file = head.into_inner();
    file.rewind().map_err(read_err)?;
    if compression == Compression::None {
        return Ok(file);
    }
    let total = file.metadata().map_err(read_err)?.len();
    let input = BufReader::with_capacity(
        READ_BUFFER,
        ProgressReader::new(file, progress, ImportStage::Decompressing, 0, total),
    );
    let mut tar = compress::decompressor(input, compression).map_err(read_err)?;
    let spool_path = work.path().join("archive.tar");
    let mut spool = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&spool_path)
        .map_err(ImageError::io(format!("creating {}", spool_path.display())))?;
    io::copy(&mut tar, &mut spool).map_err(read_err)?;
    spool.rewind().map_err(read_err)?;
    Ok(spool)
}

/// A layer extracted into the work directory, not yet visible in the store.
struct StagedLayer {
    path: PathBuf,
    diff_id: Digest,
    size: u64,
}

impl StagedLayer {
    fn verify_diff_id(self, what: &str, expected: &Digest) -> Result<Self, ImageError> {
        if self.diff_id != *expected {
            return Err(ImageError::DigestMismatch {
                what: format!("the uncompressed {what} (diff_id in the image config)"),
                expected: *expected,
                actual: self.diff_id,
            });
        }
        Ok(self)
    }
}

/// Extracts the layer blob `blob` (tar, tar+gzip or tar+zstd) into a new directory of `work` and
/// computes its diff_id; checks the blob against `blob_digest` when given.
fn stage_layer(
    blob: impl Read,
    work: &WorkDir,
    what: &str,
    blob_digest: Option<Digest>,
) -> Result<StagedLayer, ImageError> {
    let read_err = |source| ImageError::Read { what: what.to_owned(), source };
    let dest = work.new_subdir("layer")?;
    let trash = work.new_subdir("trash")?;
    let mut blob_state = HashState::default();
    let mut diff_state = HashState::default();
    {
        let mut blob = BufReader::with_capacity(READ_BUFFER, HashingReader::new(blob, &mut blob_state));
        let compression = compress::detect(&mut blob, what)?;
        tracing::debug!(layer = what, %compression, "extracting layer");
        {
            let tar = compress::decompressor(&mut blob, compression).map_err(read_err)?;
            let mut tar = HashingReader::new(tar, &mut diff_state);
            extract::extract_layer(&mut tar, &dest, &trash)?;
            // Padding after the end-of-archive blocks is part of the diff_id.
            io::copy(&mut tar, &mut io::sink()).map_err(read_err)?;
        }
        // And trailing bytes after the compressed stream are part of the blob's digest.
        io::copy(&mut blob, &mut io::sink()).map_err(read_err)?;
    }
    let (actual, _) = blob_state.finish();
    if let Some(expected) = blob_digest.filter(|e| *e != actual) {
        return Err(ImageError::DigestMismatch { what: what.to_owned(), expected, actual });
    }
    let (diff_id, size) = diff_state.finish();
    Ok(StagedLayer { path: dest, diff_id, size })
}

/// A private directory in tmp/ for one import or removal, locked (flock) while in use so that
/// [`LayerStore::open`] in another process does not take it for a crash leftover.
struct WorkDir {
    dir: tempfile::TempDir,
    _lock: File,
    next: std::cell::Cell<u32>,
}

impl WorkDir {
    fn new(tmp: &Path) -> Result<Self, ImageError> {
        let what = format!("creating a work directory in {}", tmp.display());
        let dir = tempfile::Builder::new().prefix("work-").tempdir_in(tmp).map_err(ImageError::io(what.clone()))?;
        let lock = File::open(dir.path()).map_err(ImageError::io(what.clone()))?;
        rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| ImageError::io(what.clone())(e.into()))?;
        // A concurrent `open` may have removed the directory between its creation and our lock.
        if lock.metadata().map_err(ImageError::io(what.clone()))?.nlink() == 0 {
            return Err(ImageError::io(what)(io::Error::other("removed by a concurrent store cleanup; retry")));
        }
        Ok(WorkDir { dir, _lock: lock, next: std::cell::Cell::new(0) })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A new empty directory `<prefix>-<n>` (mode 0755: it may become a layer root).
    fn new_subdir(&self, prefix: &str) -> Result<PathBuf, ImageError> {
        let n = self.next.get();
        self.next.set(n + 1);
        let path = self.path().join(format!("{prefix}-{n}"));
        fs::create_dir(&path)
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o755)))
            .map_err(ImageError::io(format!("creating {}", path.display())))?;
        Ok(path)
    }

    /// Removes the directory, reporting failure (dropping it removes it too, silently).
    fn remove(self) -> Result<(), ImageError> {
        let path = self.path().to_owned();
        self.dir.close().map_err(ImageError::io(format!("removing {}", path.display())))
    }
}

/// Counts bytes read and reports them to a progress callback.
struct ProgressReader<'p, R> {
    inner: R,
    report: &'p mut dyn FnMut(Progress),
    stage: ImportStage,
    done: u64,
    total: u64,
    reported: u64,
}

impl<'p, R> ProgressReader<'p, R> {
    fn new(inner: R, report: &'p mut dyn FnMut(Progress), stage: ImportStage, done: u64, total: u64) -> Self {
        ProgressReader { inner, report, stage, done, total, reported: done }
    }
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done - self.reported >= REPORT_EVERY || (n == 0 && self.done != self.reported) {
            self.reported = self.done;
            (self.report)(Progress { stage: self.stage, done_bytes: self.done, total_bytes: self.total });
        }
        Ok(n)
    }
}
