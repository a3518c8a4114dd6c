//! Fixtures for the image tests: layer tars with arbitrary (also hostile) entries, OCI image layouts
//! and `docker save` archives built from them, and a converter from an OCI layout (such as the ones
//! `images/build.sh` writes) to a legacy `docker save` tarball.
#![allow(dead_code)] // each test binary uses a different part

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sandbox::image::{LayerStore, Progress};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A fresh directory under cargo's per-target tmp dir (on the same disk as the build, where
/// overlayfs, xattrs and device nodes work).
pub fn scratch(name: &str) -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new().prefix(&format!("{name}-")).tempdir_in(base).unwrap()
}

pub fn import(store: &LayerStore, source: &Path) -> sandbox::image::ImportedImage {
    let mut reports: Vec<Progress> = Vec::new();
    let image = store
        .import(source, &mut |p| reports.push(p))
        .unwrap_or_else(|e| panic!("import of {} failed: {}", source.display(), chain(&e)));
    assert!(!reports.is_empty(), "no progress reported");
    image
}

pub use sandbox::error_chain as chain;

/// Builds a tar with raw names: nothing is validated, so tests can write what an attacker would.
pub struct TarBuilder {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for TarBuilder {
    fn default() -> Self {
        TarBuilder { builder: tar::Builder::new(Vec::new()) }
    }
}

pub struct Meta {
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
}

impl Default for Meta {
    fn default() -> Self {
        Meta { mode: 0o644, uid: 0, gid: 0, mtime: 1_700_000_000 }
    }
}

impl TarBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    fn raw(
        mut self,
        kind: EntryType,
        path: &str,
        link: Option<&str>,
        data: &[u8],
        meta: &Meta,
        xattrs: &[(&str, &[u8])],
    ) -> Self {
        if !xattrs.is_empty() {
            let records: Vec<(String, &[u8])> = xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v)).collect();
            self.builder.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v))).unwrap();
        }
        let mut header = Header::new_gnu();
        let name = &mut header.as_old_mut().name;
        assert!(path.len() < name.len(), "test names must fit the header");
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(link) = link {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_mode(meta.mode);
        header.set_uid(meta.uid);
        header.set_gid(meta.gid);
        header.set_mtime(meta.mtime);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.builder.append(&header, data).unwrap();
        self
    }

    pub fn dir(self, path: &str) -> Self {
        self.dir_with(path, &Meta { mode: 0o755, ..Meta::default() })
    }

    pub fn dir_with(self, path: &str, meta: &Meta) -> Self {
        self.raw(EntryType::Directory, path, None, &[], meta, &[])
    }

    pub fn file(self, path: &str, data: &[u8]) -> Self {
        self.file_with(path, data, &Meta::default(), &[])
    }

    pub fn file_with(self, path: &str, data: &[u8], meta: &Meta, xattrs: &[(&str, &[u8])]) -> Self {
        self.raw(EntryType::Regular, path, None, data, meta, xattrs)
    }

    pub fn symlink(self, path: &str, target: &str) -> Self {
        let meta = Meta { mode: 0o777, ..Meta::default() };
        self.raw(EntryType::Symlink, path, Some(target), &[], &meta, &[])
    }

    pub fn hardlink(self, path: &str, target: &str) -> Self {
        self.raw(EntryType::Link, path, Some(target), &[], &Meta::default(), &[])
    }

    pub fn node(mut self, path: &str, kind: EntryType, major: u32, minor: u32, meta: &Meta) -> Self {
        let mut header = Header::new_gnu();
        header.set_device_major(major).unwrap();
        header.set_device_minor(minor).unwrap();
        header.set_entry_type(kind);
        header.set_mode(meta.mode);
        header.set_uid(meta.uid);
        header.set_gid(meta.gid);
        header.set_mtime(meta.mtime);
        header.set_size(0);
        self.builder.append_data(&mut header, path, std::io::empty()).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

pub fn compress(data: &[u8], comp: Comp) -> Vec<u8> {
    match comp {
        Comp::None => data.to_vec(),
        Comp::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(data).unwrap();
            enc.finish().unwrap()
        }
        Comp::Zstd => zstd::encode_all(data, 3).unwrap(),
    }
}

pub fn decompress(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if data.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(data).read_to_end(&mut out).unwrap();
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        out = zstd::decode_all(data).unwrap();
    } else {
        out = data.to_vec();
    }
    out
}

/// A layer blob and the diff_id of its uncompressed tar.
#[derive(Clone)]
pub struct Layer {
    pub blob: Vec<u8>,
    pub diff_id: String,
    pub comp: Comp,
}

pub fn layer(tar: &[u8], comp: Comp) -> Layer {
    Layer { blob: compress(tar, comp), diff_id: format!("sha256:{}", sha256_hex(tar)), comp }
}

/// Writes an OCI image layout piece by piece.
pub struct OciLayout {
    pub dir: PathBuf,
}

impl OciLayout {
    pub fn new(dir: &Path) -> Self {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        OciLayout { dir: dir.to_owned() }
    }

    pub fn blob(&self, bytes: &[u8]) -> (String, usize) {
        let hex = sha256_hex(bytes);
        fs::write(self.dir.join("blobs/sha256").join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    }

    pub fn config(diff_ids: &[&str]) -> Value {
        json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/bin:/bin", "GREETING=hi"], "Cmd": ["/bin/sh"],
                       "WorkingDir": "/work", "User": "1000:1000", "Entrypoint": ["/entry"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
    }

    /// Writes config + manifest blobs for `layers` and returns the manifest's descriptor.
    pub fn image(&self, layers: &[Layer], config: &Value, annotations: Value, platform: Value) -> Value {
        let (config_digest, config_size) = self.blob(config.to_string().as_bytes());
        let layer_descs: Vec<Value> = layers
            .iter()
            .map(|l| {
                let (digest, size) = self.blob(&l.blob);
                let media = match l.comp {
                    Comp::None => "application/vnd.oci.image.layer.v1.tar",
                    Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
                    Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
                };
                json!({"mediaType": media, "digest": digest, "size": size})
            })
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": layer_descs,
        });
        let (digest, size) = self.blob(manifest.to_string().as_bytes());
        let mut desc = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                              "digest": digest, "size": size});
        if !annotations.is_null() {
            desc["annotations"] = annotations;
        }
        if !platform.is_null() {
            desc["platform"] = platform;
        }
        desc
    }

    /// The usual single-image layout: one manifest tagged `latest`, for linux/amd64.
    pub fn single(dir: &Path, layers: &[Layer]) -> OciLayout {
        let layout = OciLayout::new(dir);
        let ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let desc = layout.image(
            layers,
            &Self::config(&ids),
            json!({"org.opencontainers.image.ref.name": "latest"}),
            json!({"os": "linux", "architecture": "amd64"}),
        );
        layout.index(&[desc]);
        layout
    }

    pub fn index_json(manifests: &[Value]) -> Value {
        json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
               "manifests": manifests})
    }

    /// Writes a nested index blob and returns its descriptor.
    pub fn nested_index(&self, manifests: &[Value], annotations: Value) -> Value {
        let (digest, size) = self.blob(Self::index_json(manifests).to_string().as_bytes());
        let mut desc = json!({"mediaType": "application/vnd.oci.image.index.v1+json",
                              "digest": digest, "size": size});
        if !annotations.is_null() {
            desc["annotations"] = annotations;
        }
        desc
    }

    pub fn index(&self, manifests: &[Value]) {
        fs::write(self.dir.join("index.json"), Self::index_json(manifests).to_string()).unwrap();
    }
}

/// A tar of the directory `dir` (its contents at the archive's top level).
pub fn tar_dir(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap())
}

/// Converts the (single-image) OCI layout `layout` into a legacy `docker save` tarball, as docker
/// before 25 wrote it: `<config hex>.json`, `<layer id>/layer.tar` (uncompressed), `manifest.json`,
/// `repositories`. With `duplicate_last_layer`, the last layer is listed twice and its second copy
/// is a symlink to the first, as docker writes layers shared within one archive.
pub fn docker_archive_from_oci(layout: &Path, tag: &str, duplicate_last_layer: bool) -> Vec<u8> {
    let index = read_json(&layout.join("index.json"));
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest = read_json(&blob_path(layout, manifest_digest));
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let mut config = read_json(&blob_path(layout, config_digest));

    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
        let mut h = Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    };
    let mut layer_names = Vec::new();
    for desc in manifest["layers"].as_array().unwrap() {
        let tar = decompress(&fs::read(blob_path(layout, desc["digest"].as_str().unwrap())).unwrap());
        let id = sha256_hex(&tar);
        add(&mut b, &format!("{id}/layer.tar"), &tar);
        add(&mut b, &format!("{id}/VERSION"), b"1.0");
        layer_names.push(format!("{id}/layer.tar"));
    }
    if duplicate_last_layer {
        let last = layer_names.last().unwrap().clone();
        let dup_id = sha256_hex(b"duplicate");
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, format!("{dup_id}/layer.tar"), format!("../{last}")).unwrap();
        layer_names.push(format!("{dup_id}/layer.tar"));
        let ids = config["rootfs"]["diff_ids"].as_array_mut().unwrap();
        let last_id = ids.last().unwrap().clone();
        ids.push(last_id);
    }
    let config_bytes = config.to_string().into_bytes();
    let config_name = format!("{}.json", sha256_hex(&config_bytes));
    add(&mut b, &config_name, &config_bytes);
    let (repo, version) = tag.split_once(':').unwrap_or((tag, "latest"));
    let docker_manifest = json!([{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]);
    add(&mut b, "manifest.json", docker_manifest.to_string().as_bytes());
    let repositories = json!({repo: {version: layer_names.last().unwrap().split('/').next()}});
    add(&mut b, "repositories", repositories.to_string().as_bytes());
    b.into_inner().unwrap()
}
