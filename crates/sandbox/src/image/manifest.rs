//! From an image bundle to the list of layers to import: OCI image layouts (index → nested indexes →
//! manifest → config) and `docker save` archives (manifest.json → config). Every JSON document whose
//! digest is known is verified before it is trusted.

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;

use super::bundle::Bundle;
use super::{Digest, ImageConfig, ImageError};

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";
const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Nested indexes followed before we call the layout malformed.
const MAX_INDEX_DEPTH: usize = 8;

/// What to import from a bundle.
pub(crate) struct Plan {
    pub layers: Vec<PlannedLayer>,
    pub config: ImageConfig,
}

/// One layer: where its blob is, the blob's digest when the bundle states it, and the diff_id
/// (digest of the uncompressed tar) the image config expects.
pub(crate) struct PlannedLayer {
    pub blob: String,
    pub blob_digest: Option<Digest>,
    pub size: u64,
    pub diff_id: Digest,
}

fn bad(bundle: &dyn Bundle, message: String) -> ImageError {
    ImageError::BadImage { source_path: bundle.path().to_owned(), message }
}

fn blob_name(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

fn parse_digest(digest: &impl ToString) -> Result<Digest, ImageError> {
    digest.to_string().parse()
}

/// Reads a JSON blob and checks it against its descriptor's digest and size.
fn read_verified(bundle: &dyn Bundle, name: &str, digest: &Digest, size: Option<u64>) -> Result<Vec<u8>, ImageError> {
    let bytes = bundle.read_small(name)?;
    let actual = Digest::of(&bytes);
    if actual != *digest {
        return Err(ImageError::DigestMismatch { what: bundle.describe(name), expected: *digest, actual });
    }
    if let Some(size) = size.filter(|s| *s != bytes.len() as u64) {
        return Err(bad(bundle, format!("{name} is {} bytes, its descriptor says {size}", bytes.len())));
    }
    Ok(bytes)
}

fn read_descriptor(bundle: &dyn Bundle, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let digest = parse_digest(desc.digest())?;
    read_verified(bundle, &blob_name(&digest), &digest, Some(desc.size()))
}

fn oci_json_error(bundle: &dyn Bundle, name: &str) -> impl FnOnce(oci_spec::OciSpecError) -> ImageError {
    let what = bundle.describe(name);
    move |source| ImageError::OciJson { what, source }
}

/// A manifest found in an OCI layout, with the name it is tagged with.
struct Candidate {
    desc: Descriptor,
    names: Vec<String>,
}

/// Plans the import of the image of an OCI layout; `reference` selects a manifest by its
/// `org.opencontainers.image.ref.name` (or full `io.containerd.image.name`) annotation.
pub(crate) fn plan_oci(bundle: &dyn Bundle, reference: Option<&str>) -> Result<Plan, ImageError> {
    let index =
        ImageIndex::from_reader(&bundle.read_small("index.json")?[..]).map_err(oci_json_error(bundle, "index.json"))?;
    let mut candidates = Vec::new();
    collect_manifests(bundle, &index, &[], 0, &mut candidates)?;

    if let Some(reference) = reference {
        let available = tag_list(candidates.iter().flat_map(|c| c.names.iter()));
        candidates.retain(|c| c.names.iter().any(|n| n == reference));
        if candidates.is_empty() {
            return Err(bad(bundle, format!("no image is tagged {reference:?} (tags: {available})")));
        }
    }
    let all_platforms = platform_list(&candidates);
    candidates.retain(|c| platform_matches(&c.desc));
    candidates.dedup_by(|a, b| a.desc.digest() == b.desc.digest());
    let chosen = match candidates.as_slice() {
        [one] => one,
        [] => return Err(bad(bundle, format!("no image for linux/{} (platforms: {all_platforms})", host_arch()))),
        several => {
            let tags = tag_list(several.iter().flat_map(|c| c.names.iter()));
            return Err(bad(bundle, format!("it holds several images; choose one with PATH:REF (tags: {tags})")));
        }
    };

    let manifest_name = blob_name(&parse_digest(chosen.desc.digest())?);
    let manifest = ImageManifest::from_reader(&read_descriptor(bundle, &chosen.desc)?[..])
        .map_err(oci_json_error(bundle, &manifest_name))?;
    let config_name = blob_name(&parse_digest(manifest.config().digest())?);
    let config = ImageConfiguration::from_reader(&read_descriptor(bundle, manifest.config())?[..])
        .map_err(oci_json_error(bundle, &config_name))?;

    let diff_ids = diff_ids(bundle, &config, manifest.layers().len())?;
    let layers = manifest
        .layers()
        .iter()
        .zip(diff_ids)
        .map(|(desc, diff_id)| {
            let digest = parse_digest(desc.digest())?;
            Ok(PlannedLayer { blob: blob_name(&digest), blob_digest: Some(digest), size: desc.size(), diff_id })
        })
        .collect::<Result<_, ImageError>>()?;
    Ok(Plan { layers, config: image_config(&config) })
}

fn collect_manifests(
    bundle: &dyn Bundle,
    index: &ImageIndex,
    outer_names: &[String],
    depth: usize,
    out: &mut Vec<Candidate>,
) -> Result<(), ImageError> {
    if depth > MAX_INDEX_DEPTH {
        return Err(bad(bundle, "image indexes nest too deep".to_owned()));
    }
    for desc in index.manifests() {
        let mut names = outer_names.to_vec();
        if let Some(annotations) = desc.annotations() {
            names.extend([REF_NAME, CONTAINERD_NAME].iter().filter_map(|k| annotations.get(*k).cloned()));
        }
        let media_type = desc.media_type();
        match media_type {
            t if is_index(t) => {
                let nested = ImageIndex::from_reader(&read_descriptor(bundle, desc)?[..])
                    .map_err(oci_json_error(bundle, desc.digest().as_ref()))?;
                collect_manifests(bundle, &nested, &names, depth + 1, out)?;
            }
            t if is_manifest(t) => out.push(Candidate { desc: desc.clone(), names }),
            other => tracing::debug!(media_type = %other, "skipping index entry"),
        }
    }
    Ok(())
}

fn is_index(t: &MediaType) -> bool {
    matches!(t, MediaType::ImageIndex) || matches!(t, MediaType::Other(o) if o == DOCKER_MANIFEST_LIST)
}

fn is_manifest(t: &MediaType) -> bool {
    matches!(t, MediaType::ImageManifest) || matches!(t, MediaType::Other(o) if o == DOCKER_MANIFEST_V2)
}

/// The GOARCH name of the machine we run on.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// A manifest without a platform is taken as ours; attestations (`unknown/unknown`) never are.
fn platform_matches(desc: &Descriptor) -> bool {
    desc.platform()
        .as_ref()
        .is_none_or(|p| p.os().to_string() == "linux" && p.architecture().to_string() == host_arch())
}

fn platform_list(candidates: &[Candidate]) -> String {
    let list: Vec<String> = candidates
        .iter()
        .filter_map(|c| c.desc.platform().as_ref())
        .map(|p| format!("{}/{}", p.os(), p.architecture()))
        .collect();
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join(", ")
    }
}

fn tag_list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let mut names: Vec<&str> = names.map(String::as_str).collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

fn diff_ids(bundle: &dyn Bundle, config: &ImageConfiguration, layer_count: usize) -> Result<Vec<Digest>, ImageError> {
    let ids = config.rootfs().diff_ids();
    if ids.len() != layer_count {
        return Err(bad(bundle, format!("the image config lists {} diff_ids for {layer_count} layers", ids.len())));
    }
    ids.iter().map(|id| id.parse()).collect()
}

fn image_config(config: &ImageConfiguration) -> ImageConfig {
    let Some(c) = config.config() else {
        return ImageConfig::default();
    };
    ImageConfig {
        env: c.env().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().filter(|d| !d.is_empty()),
        user: c.user().clone().filter(|u| !u.is_empty()),
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
    }
}

/// One image of a `docker save` archive's manifest.json.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct DockerImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Parses a docker-save manifest.json; `None` if the document is not one (then the bundle is taken
/// as a plain rootfs that happens to hold a file of that name).
pub(crate) fn parse_docker_manifest(bytes: &[u8]) -> Option<Vec<DockerImage>> {
    serde_json::from_slice::<Vec<DockerImage>>(bytes).ok().filter(|images| !images.is_empty())
}

/// The digest a docker archive name carries: `blobs/sha256/<hex>` (docker 25+) or `<hex>.json`
/// (older configs). Older layer names (`<id>/layer.tar`) carry none.
fn digest_in_name(name: &str) -> Option<Digest> {
    let name = name.trim_start_matches("./");
    if let Some(hex) = name.strip_prefix("blobs/sha256/") {
        return Digest::from_hex(hex).ok();
    }
    Digest::from_hex(name.strip_suffix(".json")?).ok()
}

/// Plans the import of an image of a `docker save` archive; `reference` selects by repo tag
/// (`name:tag`, or `name` for `name:latest`).
pub(crate) fn plan_docker(
    bundle: &dyn Bundle,
    images: &[DockerImage],
    reference: Option<&str>,
) -> Result<Plan, ImageError> {
    let tags = |image: &DockerImage| image.repo_tags.clone().unwrap_or_default();
    let chosen: Vec<&DockerImage> = match reference {
        Some(r) => images.iter().filter(|i| tags(i).iter().any(|t| t == r || *t == format!("{r}:latest"))).collect(),
        None => images.iter().collect(),
    };
    let image = match chosen.as_slice() {
        [one] => *one,
        _ => {
            let all: Vec<String> = images.iter().flat_map(tags).collect();
            let all = tag_list(all.iter());
            return Err(bad(
                bundle,
                match reference {
                    Some(r) if chosen.is_empty() => {
                        format!("no image is tagged {r:?} (tags: {all})")
                    }
                    _ => format!("it holds several images; choose one with PATH:REF (tags: {all})"),
                },
            ));
        }
    };

    let config_bytes = match digest_in_name(&image.config) {
        Some(digest) => read_verified(bundle, &image.config, &digest, None)?,
        None => bundle.read_small(&image.config)?,
    };
    let config = ImageConfiguration::from_reader(&config_bytes[..]).map_err(oci_json_error(bundle, &image.config))?;
    let diff_ids = diff_ids(bundle, &config, image.layers.len())?;
    let layers = image
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(name, diff_id)| {
            let (_, size) = bundle.open(name)?;
            Ok(PlannedLayer { blob: name.clone(), blob_digest: digest_in_name(name), size, diff_id })
        })
        .collect::<Result<_, ImageError>>()?;
    Ok(Plan { layers, config: image_config(&config) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_names_carry_digests() {
        let hex = Digest::of(b"x").hex();
        assert_eq!(digest_in_name(&format!("blobs/sha256/{hex}")), Some(Digest::from_hex(&hex).unwrap()));
        assert_eq!(digest_in_name(&format!("{hex}.json")), Some(Digest::from_hex(&hex).unwrap()));
        assert_eq!(digest_in_name("abc/layer.tar"), None);
    }
}
