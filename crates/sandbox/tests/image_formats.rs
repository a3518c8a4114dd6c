//! Every source format the importer auto-detects, with every layer compression, built from real tars.

mod image_support;

use std::fs;
use std::path::Path;

use image_support::*;
use sandbox::image::{Digest, ImageError, LayerStore, SourceFormat};
use serde_json::json;

fn base_tar() -> Vec<u8> {
    TarBuilder::new()
        .dir("etc/")
        .file("etc/hello", b"hello from the base layer\n")
        .dir("bin/")
        .file_with("bin/tool", b"#!/bin/sh\n", &Meta { mode: 0o755, ..Meta::default() }, &[])
        .symlink("bin/alias", "tool")
        .finish()
}

fn top_tar(n: u32) -> Vec<u8> {
    TarBuilder::new().dir("srv/").file(&format!("srv/top{n}"), format!("top layer {n}\n").as_bytes()).finish()
}

fn digest(s: &str) -> Digest {
    s.parse().unwrap()
}

#[test]
fn oci_layout_directory_with_each_compression() {
    let dir = scratch("oci-dir");
    let layers = [layer(&base_tar(), Comp::None), layer(&top_tar(1), Comp::Gzip), layer(&top_tar(2), Comp::Zstd)];
    OciLayout::single(&dir.path().join("layout"), &layers);
    let store = LayerStore::open(&dir.path().join("store")).unwrap();

    let image = import(&store, &dir.path().join("layout"));
    assert_eq!(image.format, SourceFormat::OciLayout);
    let ids: Vec<Digest> = image.layers.iter().map(|l| l.diff_id).collect();
    let expected: Vec<Digest> = layers.iter().map(|l| digest(&l.diff_id)).collect();
    assert_eq!(ids, expected, "layers bottom first, named by diff_id");
    assert_eq!(image.layers[0].size, base_tar().len() as u64);
    assert_eq!(image.config.env, ["PATH=/usr/bin:/bin", "GREETING=hi"]);
    assert_eq!(image.config.cmd, ["/bin/sh"]);
    assert_eq!(image.config.entrypoint, ["/entry"]);
    assert_eq!(image.config.working_dir.as_deref(), Some("/work"));
    assert_eq!(image.config.user.as_deref(), Some("1000:1000"));

    let base = store.layer_path(&ids[0]);
    assert_eq!(fs::read(base.join("etc/hello")).unwrap(), b"hello from the base layer\n");
    assert_eq!(fs::read_link(base.join("bin/alias")).unwrap(), Path::new("tool"));
    assert_eq!(fs::read(store.layer_path(&ids[1]).join("srv/top1")).unwrap(), b"top layer 1\n");
    assert_eq!(fs::read(store.layer_path(&ids[2]).join("srv/top2")).unwrap(), b"top layer 2\n");
    assert_eq!(store.layers().unwrap(), {
        let mut sorted = expected.clone();
        sorted.sort();
        sorted
    });
    assert_eq!(fs::read_dir(dir.path().join("store/tmp")).unwrap().count(), 0, "import leaves nothing in tmp/");

    // The daemon stores the result as JSON in its catalog.
    let json = serde_json::to_string(&image).unwrap();
    assert_eq!(serde_json::from_str::<sandbox::image::ImportedImage>(&json).unwrap(), image);
}

#[test]
fn oci_archive_plain_and_compressed() {
    let dir = scratch("oci-tar");
    let layers = [layer(&base_tar(), Comp::Gzip), layer(&top_tar(1), Comp::Zstd)];
    OciLayout::single(&dir.path().join("layout"), &layers);
    let tar = tar_dir(&dir.path().join("layout"));
    for comp in [Comp::None, Comp::Gzip, Comp::Zstd] {
        let store = LayerStore::open(&dir.path().join(format!("store-{comp:?}"))).unwrap();
        let archive = dir.path().join(format!("image-{comp:?}.tar"));
        fs::write(&archive, compress(&tar, comp)).unwrap();
        let image = import(&store, &archive);
        assert_eq!(image.format, SourceFormat::OciArchive, "{comp:?}");
        assert_eq!(image.layers.len(), 2);
        assert_eq!(fs::read(store.layer_path(&image.layers[1].diff_id).join("srv/top1")).unwrap(), b"top layer 1\n");
        assert_eq!(
            fs::read_dir(dir.path().join(format!("store-{comp:?}/tmp"))).unwrap().count(),
            0,
            "the decompressed archive is removed"
        );
    }
}

#[test]
fn docker_25_archive_with_oci_layout_and_manifest_json() {
    let dir = scratch("docker-new");
    let layers = [layer(&base_tar(), Comp::None), layer(&top_tar(1), Comp::None)];
    let layout = OciLayout::single(&dir.path().join("layout"), &layers);
    // docker 25+ writes both: the OCI layout and a manifest.json pointing into blobs/.
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.dir.join("index.json")).unwrap()).unwrap();
    let manifest_hex = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_owned();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.dir.join("blobs/sha256").join(&manifest_hex)).unwrap()).unwrap();
    let blob = |d: &serde_json::Value| format!("blobs/sha256/{}", &d.as_str().unwrap()[7..]);
    let docker_manifest = json!([{
        "Config": blob(&manifest["config"]["digest"]),
        "RepoTags": ["app:1"],
        "Layers": manifest["layers"].as_array().unwrap().iter().map(|l| blob(&l["digest"])).collect::<Vec<_>>(),
    }]);
    fs::write(layout.dir.join("manifest.json"), docker_manifest.to_string()).unwrap();
    let archive = dir.path().join("save.tar");
    fs::write(&archive, tar_dir(&layout.dir)).unwrap();

    let store = LayerStore::open(&dir.path().join("store")).unwrap();
    let image = import(&store, &archive);
    assert_eq!(image.format, SourceFormat::OciArchive);
    assert_eq!(image.layers.len(), 2);
}

#[test]
fn legacy_docker_save_archive_and_directory() {
    let dir = scratch("docker-legacy");
    let layers = [layer(&base_tar(), Comp::Gzip), layer(&top_tar(1), Comp::Gzip)];
    let layout = OciLayout::single(&dir.path().join("layout"), &layers);
    let archive = dir.path().join("save.tar");
    fs::write(&archive, docker_archive_from_oci(&layout.dir, "test/app:1", true)).unwrap();

    let store = LayerStore::open(&dir.path().join("store")).unwrap();
    let image = import(&store, &archive);
    assert_eq!(image.format, SourceFormat::DockerArchive);
    let ids: Vec<Digest> = image.layers.iter().map(|l| l.diff_id).collect();
    assert_eq!(ids.len(), 3, "the symlinked duplicate layer is listed too");
    assert_eq!(ids[0], digest(&layers[0].diff_id));
    assert_eq!(ids[1], ids[2]);
    assert_eq!(image.config.cmd, ["/bin/sh"]);
    assert_eq!(store.layers().unwrap().len(), 2);

    // Select by repo tag; a tag that is not there is a clear error.
    let tagged = dir.path().join("save.tar:test/app:1");
    assert_eq!(import(&store, &tagged).layers, image.layers);
    let err = store.import(&dir.path().join("save.tar:other"), &mut |_| {}).unwrap_err();
    assert!(chain(&err).contains("no image is tagged \"other\" (tags: test/app:1)"), "{}", chain(&err));

    // The same archive unpacked into a directory.
    let unpacked = dir.path().join("unpacked");
    tar::Archive::new(&fs::read(&archive).unwrap()[..]).unpack(&unpacked).unwrap();
    let store2 = LayerStore::open(&dir.path().join("store2")).unwrap();
    let image2 = import(&store2, &unpacked);
    assert_eq!(image2.format, SourceFormat::DockerDir);
    assert_eq!(image2.layers, image.layers);
}

#[test]
fn rootfs_tarball_in_each_compression() {
    let dir = scratch("rootfs-tar");
    let tar = base_tar();
    for comp in [Comp::None, Comp::Gzip, Comp::Zstd] {
        let store = LayerStore::open(&dir.path().join(format!("store-{comp:?}"))).unwrap();
        let path = dir.path().join(format!("rootfs-{comp:?}.tar"));
        fs::write(&path, compress(&tar, comp)).unwrap();
        let image = import(&store, &path);
        assert_eq!(image.format, SourceFormat::RootfsTar);
        assert_eq!(image.layers.len(), 1);
        assert_eq!(image.layers[0].diff_id, digest(&format!("sha256:{}", sha256_hex(&tar))));
        assert_eq!(image.config, Default::default());
        assert_eq!(
            fs::read(store.layer_path(&image.layers[0].diff_id).join("etc/hello")).unwrap(),
            b"hello from the base layer\n"
        );
        let err = store.import(&dir.path().join(format!("rootfs-{comp:?}.tar:latest")), &mut |_| {}).unwrap_err();
        assert!(matches!(err, ImageError::ReferenceOnRootfs { .. }), "{err}");
    }
}

#[test]
fn references_nested_indexes_and_platforms() {
    let dir = scratch("oci-refs");
    let layout = OciLayout::new(&dir.path().join("layout"));
    let image_with = |n: u32, platform: serde_json::Value| {
        let l = layer(&top_tar(n), Comp::Gzip);
        let config = OciLayout::config(&[l.diff_id.as_str()]);
        layout.image(&[l], &config, serde_json::Value::Null, platform)
    };
    // "multi" is a nested index with an arm64 and an amd64 image plus a buildkit attestation;
    // "other" is a plain manifest.
    let multi = layout.nested_index(
        &[
            image_with(1, json!({"os": "linux", "architecture": "arm64"})),
            image_with(2, json!({"os": "linux", "architecture": "amd64"})),
            image_with(3, json!({"os": "unknown", "architecture": "unknown"})),
        ],
        json!({"org.opencontainers.image.ref.name": "multi"}),
    );
    let mut other = image_with(4, serde_json::Value::Null);
    other["annotations"] = json!({"org.opencontainers.image.ref.name": "other"});
    layout.index(&[multi, other]);

    let store = LayerStore::open(&dir.path().join("store")).unwrap();
    let err = store.import(&layout.dir, &mut |_| {}).unwrap_err();
    assert!(chain(&err).contains("several images; choose one with PATH:REF (tags: multi, other)"), "{}", chain(&err));
    let top = |image: &sandbox::image::ImportedImage| {
        let layer = store.layer_path(&image.layers[0].diff_id);
        fs::read_dir(layer.join("srv"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect::<Vec<_>>()
    };
    let multi = import(&store, &dir.path().join("layout:multi"));
    assert_eq!(top(&multi), ["top2"], "linux/amd64 chosen from the nested index");
    let other = import(&store, &dir.path().join("layout:other"));
    assert_eq!(top(&other), ["top4"]);
    let err = store.import(&dir.path().join("layout:missing"), &mut |_| {}).unwrap_err();
    assert!(chain(&err).contains("no image is tagged \"missing\""));
}

#[test]
fn missing_source_and_unsupported_compression_are_clear_errors() {
    let dir = scratch("bad-source");
    let store = LayerStore::open(&dir.path().join("store")).unwrap();
    let err = store.import(&dir.path().join("nope"), &mut |_| {}).unwrap_err();
    assert!(matches!(err, ImageError::SourceNotFound { .. }), "{err}");

    let empty = dir.path().join("empty.tar");
    fs::write(&empty, b"").unwrap();
    let err = store.import(&empty, &mut |_| {}).unwrap_err();
    assert!(chain(&err).contains("empty tar archive"), "{}", chain(&err));
    let garbage = dir.path().join("garbage.tar");
    fs::write(&garbage, vec![b'x'; 2048]).unwrap();
    let err = store.import(&garbage, &mut |_| {}).unwrap_err();
    assert!(matches!(err, ImageError::Read { .. }), "{}", chain(&err));
    assert!(store.layers().unwrap().is_empty());

    let xz = dir.path().join("rootfs.tar.xz");
    fs::write(&xz, b"\xfd7zXZ\0rest of an xz stream").unwrap();
    let err = store.import(&xz, &mut |_| {}).unwrap_err();
    assert!(chain(&err).contains("compressed with xz; only tar, tar+gzip and tar+zstd"), "{}", chain(&err));
}

/// The images `images/build.sh` builds, when `DELTABOX_TEST_IMAGES` points to them: the busybox
/// OCI layout, and the same image as a legacy `docker save` tarball.
#[test]
fn built_busybox_image_as_oci_layout_and_docker_archive() {
    let Some(images) = std::env::var_os("DELTABOX_TEST_IMAGES") else {
        testing::skip("DELTABOX_TEST_IMAGES is not set (run images/build.sh and point it at the output)");
        return;
    };
    let layout = Path::new(&images).join("busybox");
    let dir = scratch("busybox");
    let store = LayerStore::open(&dir.path().join("store")).unwrap();
    let image = import(&store, &layout);
    assert_eq!(image.format, SourceFormat::OciLayout);
    let root = store.layer_path(&image.layers[0].diff_id);
    assert!(root.join("bin/busybox").is_file());
    assert_eq!(fs::read_link(root.join("bin/sh")).unwrap(), Path::new("/bin/busybox"));
    assert!(fs::read_to_string(root.join("etc/passwd")).unwrap().starts_with("root:x:0:0:"));
    assert!(image.config.env.iter().any(|e| e.starts_with("PATH=")));

    let archive = dir.path().join("busybox-docker.tar");
    fs::write(&archive, docker_archive_from_oci(&layout, "busybox:latest", false)).unwrap();
    let store2 = LayerStore::open(&dir.path().join("store2")).unwrap();
    let from_docker = import(&store2, &dir.path().join("busybox-docker.tar:busybox"));
    assert_eq!(from_docker.format, SourceFormat::DockerArchive);
    assert_eq!(from_docker.layers, image.layers);
}
