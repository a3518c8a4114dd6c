//! The daemon's crash-safe catalog: images and sandboxes in SQLite (WAL mode). Every change is one
//! transaction, so after a crash the catalog holds exactly what was committed. Commits are not fsynced
//! (`synchronous = NORMAL`): after a power loss the newest may be gone, which is why a checkpoint is
//! reported durable only once a sync of the data directory's filesystem followed its record (see
//! `daemon/engine/durable.rs`).
//!
//! The schema carries a version (`PRAGMA user_version`): [`MIGRATIONS`] bring an older catalog up to
//! date, one transaction each, and a catalog of a newer version is refused.

use std::path::Path;

use deltacr::image::ImageId;
use deltafs::StackId;
use rusqlite::{params, Connection, OptionalExtension};
use sandbox::cgroup::Limits;
use sandbox::image::{Digest, ImageConfig, LayerInfo, SourceFormat};
use sandbox::spec::Network;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog database error")]
    Sql(#[from] rusqlite::Error),
    #[error("catalog holds a malformed record")]
    Json(#[from] serde_json::Error),
    #[error(
        "the catalog has schema version {found}, newer than this deltabox's ({supported}): it was written by a \
         newer deltabox; run that one, or use another --data-dir"
    )]
    Newer { found: i64, supported: i64 },
}

type Result<T> = std::result::Result<T, CatalogError>;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    /// Bottom layer first.
    pub layers: Vec<LayerInfo>,
    pub config: ImageConfig,
    pub format: SourceFormat,
    /// Where it was imported from.
    pub source: String,
    /// Seconds since the epoch.
    pub created: i64,
    /// The DeltaFS stack of its layers, once indexed.
    #[serde(default, with = "crate::ids::opt_text")]
    pub base_stack: Option<StackId>,
}

impl ImageRecord {
    /// Uncompressed size of all layers.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// What a sandbox is made of and how its processes run; copied into each checkpoint so the checkpoint can
/// be forked after the sandbox is gone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxConfig {
    pub image: String,
    /// The image layers beneath its filesystem (kept so the image may be removed or re-tagged).
    pub layers: Vec<Digest>,
    pub network: Network,
    /// What it may reach in the `nat` network (absent in records written before there was a policy).
    #[serde(default)]
    pub egress: crate::api::EgressPolicy,
    pub limits: Limits,
    /// Size limits of its filesystem (absent in records written before there were any).
    #[serde(default)]
    pub disk: deltafs::Quota,
    /// Most memory its checkpoints' templates may hold (None in records written before there was a budget:
    /// the daemon's alone applies).
    #[serde(default)]
    pub template_memory: Option<u64>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    #[serde(flatten)]
    pub config: SandboxConfig,
    /// The DeltaFS stack it was started from (an image's base, or a checkpoint's).
    #[serde(with = "crate::ids::text")]
    pub stack: StackId,
    /// The checkpoint it was forked from.
    pub origin: Option<String>,
    /// The checkpoint its current state descends from (parent of its next checkpoint).
    pub head: Option<String>,
    pub created: i64,
    /// Its ports published on the host (`nat` network; not inherited by forks).
    #[serde(default)]
    pub ports: Vec<crate::api::PublishedPort>,
}

/// Why a checkpoint's process image could not be written, as the shim classified it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageFailure {
    pub kind: crate::shim::proto::ErrorKind,
    pub reason: String,
}

/// What a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKind {
    /// Files and processes.
    Full,
    /// Files only: processes were not captured.
    Filesystem,
}

impl CheckpointKind {
    /// The parts it covers, as the API names them.
    pub fn covers(self) -> Vec<String> {
        match self {
            CheckpointKind::Full => vec!["filesystem".into(), "processes".into()],
            CheckpointKind::Filesystem => vec!["filesystem".into()],
        }
    }
}

impl std::fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, so widths in format strings apply.
        f.pad(match self {
            CheckpointKind::Full => "full",
            CheckpointKind::Filesystem => "filesystem",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub id: String,
    /// The sandbox it was taken in (which may no longer exist).
    pub sandbox: String,
    pub parent: Option<String>,
    /// The frozen DeltaFS stack.
    #[serde(with = "crate::ids::text")]
    pub stack: StackId,
    pub kind: CheckpointKind,
    /// The DeltaCR image of its processes (full checkpoints).
    #[serde(default, with = "crate::ids::opt_text")]
    pub image: Option<ImageId>,
    /// Whether its process image is written (a full checkpoint's image is written after the sandbox runs
    /// again; until then it lives in the shim's memory only). False for a filesystem checkpoint.
    #[serde(default)]
    pub image_written: bool,
    /// Whether all of it — record, files and process image — is on disk, so it survives a power loss.
    #[serde(default)]
    pub durable: bool,
    /// Why its process image could not be written (then it never will be: forks fail at once).
    #[serde(default)]
    pub image_failure: Option<ImageFailure>,
    /// Processes captured.
    #[serde(default)]
    pub processes: Option<usize>,
    /// Shell sessions whose shells were captured (served again after a restore).
    #[serde(default)]
    pub sessions: Vec<crate::shim::proto::SessionSnapshot>,
    pub config: SandboxConfig,
    pub created: i64,
    /// The pause the sandbox saw (freeze to thaw, measured by its shim).
    #[serde(alias = "latency_ms")]
    pub pause_ms: f64,
    /// The checkpoint call's duration in the daemon (0 in records from before it was kept).
    #[serde(default)]
    pub duration_ms: f64,
    /// Connections to outside the sandbox that a rollback to it or a fork of it gives back reset.
    #[serde(default)]
    pub reset_connections: Vec<String>,
    /// The sandbox's address in the `nat` network when it was taken: a restore elsewhere moves its
    /// sockets from it (absent in records written before there was such a network).
    #[serde(default)]
    pub address: Option<std::net::Ipv4Addr>,
}

pub struct Catalog {
    conn: Connection,
}

/// Each step brings the catalog from the version before it to `.0`.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        2,
        "CREATE TABLE IF NOT EXISTS images (name TEXT PRIMARY KEY, record TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS sandboxes (id TEXT PRIMARY KEY, record TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS checkpoints (id TEXT PRIMARY KEY, record TEXT NOT NULL);",
    ),
    // `durable` meant "the process image is written"; it now means "all on disk", which nothing was
    // made before (the daemon syncs them at its next start), and the old meaning is `image_written`.
    (
        3,
        "UPDATE checkpoints SET record = json_set(record,
             '$.image_written', json(CASE WHEN json_extract(record, '$.image') IS NOT NULL
                                           AND json_extract(record, '$.durable') THEN 'true' ELSE 'false' END),
             '$.durable', json('false'));",
    ),
];

/// The schema version this deltabox writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut catalog = Catalog { conn };
        catalog.migrate()?;
        Ok(catalog)
    }

    fn migrate(&mut self) -> Result<()> {
        let found: i64 = self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(CatalogError::Newer { found, supported: SCHEMA_VERSION });
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()?;
            tracing::info!(version, "catalog schema migrated");
        }
        Ok(())
    }

    pub fn put_image(&self, image: &ImageRecord) -> Result<()> {
        self.conn.execute(
            "INSERT INTO images (name, record) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET record = excluded.record",
            params![image.name, serde_json::to_string(image)?],
        )?;
        Ok(())
    }

    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>> {
        self.one("SELECT record FROM images WHERE name = ?1", name)
    }

    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        self.all("SELECT record FROM images ORDER BY name")
    }

    pub fn delete_image(&self, name: &str) -> Result<bool> {
        Ok(self.conn.execute("DELETE FROM images WHERE name = ?1", [name])? > 0)
    }

    pub fn put_sandbox(&self, sandbox: &SandboxRecord) -> Result<()> {
        self.conn.execute(
            "INSERT INTO sandboxes (id, record) VALUES (?1, ?2)",
            params![sandbox.id, serde_json::to_string(sandbox)?],
        )?;
        Ok(())
    }

    pub fn sandboxes(&self) -> Result<Vec<SandboxRecord>> {
        self.all("SELECT record FROM sandboxes ORDER BY id")
    }

    pub fn update_sandbox(&self, sandbox: &SandboxRecord) -> Result<()> {
        self.conn.execute(
            "UPDATE sandboxes SET record = ?2 WHERE id = ?1",
            params![sandbox.id, serde_json::to_string(sandbox)?],
        )?;
        Ok(())
    }

    pub fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>> {
        self.one("SELECT record FROM sandboxes WHERE id = ?1", id)
    }

    pub fn delete_sandbox(&self, id: &str) -> Result<bool> {
        Ok(self.conn.execute("DELETE FROM sandboxes WHERE id = ?1", [id])? > 0)
    }

    /// Records checkpoint `cp` and makes it the head of its sandbox, in one transaction.
    pub fn add_checkpoint(&mut self, cp: &CheckpointRecord) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute("INSERT INTO checkpoints (id, record) VALUES (?1, ?2)", params![cp.id, serde_json::to_string(cp)?])?;
        set_head(&tx, &cp.sandbox, Some(&cp.id))?;
        tx.commit()?;
        Ok(())
    }

    /// Records that checkpoint `id`'s process image is written.
    pub fn mark_image_written(&self, id: &str) -> Result<()> {
        self.modify_checkpoint(id, |cp| cp.image_written = true)
    }

    /// Records that all of checkpoint `id` is on disk.
    pub fn mark_durable(&self, id: &str) -> Result<()> {
        self.modify_checkpoint(id, |cp| cp.durable = true)
    }

    pub fn mark_image_failed(&self, id: &str, failure: ImageFailure) -> Result<()> {
        self.modify_checkpoint(id, |cp| cp.image_failure = Some(failure))
    }

    fn modify_checkpoint(&self, id: &str, change: impl FnOnce(&mut CheckpointRecord)) -> Result<()> {
        if let Some(mut cp) = self.checkpoint(id)? {
            change(&mut cp);
            self.conn.execute(
                "UPDATE checkpoints SET record = ?2 WHERE id = ?1",
                params![id, serde_json::to_string(&cp)?],
            )?;
        }
        Ok(())
    }

    pub fn checkpoint(&self, id: &str) -> Result<Option<CheckpointRecord>> {
        self.one("SELECT record FROM checkpoints WHERE id = ?1", id)
    }

    pub fn checkpoints(&self) -> Result<Vec<CheckpointRecord>> {
        self.all("SELECT record FROM checkpoints ORDER BY id")
    }

    /// Deletes checkpoints `ids`; checkpoints and sandboxes that pointed at a deleted one point at its
    /// parent instead (one transaction).
    pub fn delete_checkpoints(&mut self, ids: &[String]) -> Result<()> {
        let mut all: std::collections::HashMap<String, CheckpointRecord> =
            self.checkpoints()?.into_iter().map(|c| (c.id.clone(), c)).collect();
        let doomed: std::collections::HashSet<&String> = ids.iter().collect();
        // The nearest ancestor that survives.
        let survivor = |mut id: Option<String>| {
            while let Some(cur) = id.as_ref().filter(|c| doomed.contains(c)) {
                id = all.get(cur).and_then(|c| c.parent.clone());
            }
            id
        };
        let relinked: Vec<(String, Option<String>)> = all
            .values()
            .filter(|c| !doomed.contains(&c.id) && c.parent.as_ref().is_some_and(|p| doomed.contains(p)))
            .map(|c| (c.id.clone(), survivor(c.parent.clone())))
            .collect();
        // A sandbox at (head) or forked from (origin) a deleted checkpoint moves to the nearest survivor:
        // it may still roll back to that one and its ancestors.
        let is_doomed = |c: &Option<String>| c.as_ref().is_some_and(|c| doomed.contains(c));
        let moved: Vec<SandboxRecord> = self
            .sandboxes()?
            .into_iter()
            .filter(|s| is_doomed(&s.head) || is_doomed(&s.origin))
            .map(|mut s| {
                s.head = survivor(s.head.take());
                s.origin = survivor(s.origin.take());
                s
            })
            .collect();
        let tx = self.conn.transaction()?;
        for (id, parent) in relinked {
            let cp = all.get_mut(&id).expect("listed");
            cp.parent = parent;
            tx.execute("UPDATE checkpoints SET record = ?2 WHERE id = ?1", params![id, serde_json::to_string(&*cp)?])?;
        }
        for sandbox in moved {
            tx.execute(
                "UPDATE sandboxes SET record = ?2 WHERE id = ?1",
                params![sandbox.id, serde_json::to_string(&sandbox)?],
            )?;
        }
        for id in ids {
            tx.execute("DELETE FROM checkpoints WHERE id = ?1", [id])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every layer some image, sandbox or checkpoint still needs.
    pub fn referenced_layers(&self) -> Result<std::collections::HashSet<Digest>> {
        let mut used: std::collections::HashSet<Digest> =
            self.images()?.into_iter().flat_map(|i| i.layers.into_iter().map(|l| l.diff_id)).collect();
        used.extend(self.sandboxes()?.into_iter().flat_map(|s| s.config.layers));
        used.extend(self.checkpoints()?.into_iter().flat_map(|c| c.config.layers));
        Ok(used)
    }

    /// Every DeltaFS stack the catalog names: image bases and checkpoints.
    pub fn referenced_stacks(&self) -> Result<Vec<StackId>> {
        let mut stacks: Vec<StackId> = self.images()?.into_iter().filter_map(|i| i.base_stack).collect();
        stacks.extend(self.checkpoints()?.into_iter().map(|c| c.stack));
        Ok(stacks)
    }

    fn one<T: serde::de::DeserializeOwned>(&self, sql: &str, key: &str) -> Result<Option<T>> {
        let json: Option<String> = self.conn.query_row(sql, [key], |r| r.get(0)).optional()?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    fn all<T: serde::de::DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>> {
        let mut stmt = self.conn.prepare(sql)?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(serde_json::from_str(&row?)?);
        }
        Ok(out)
    }
}

fn set_head(tx: &rusqlite::Transaction<'_>, sandbox: &str, head: Option<&str>) -> Result<()> {
    let json: Option<String> =
        tx.query_row("SELECT record FROM sandboxes WHERE id = ?1", [sandbox], |r| r.get(0)).optional()?;
    if let Some(json) = json {
        let mut record: SandboxRecord = serde_json::from_str(&json)?;
        record.head = head.map(String::from);
        tx.execute(
            "UPDATE sandboxes SET record = ?2 WHERE id = ?1",
            params![sandbox, serde_json::to_string(&record)?],
        )?;
    }
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn config(layer: Digest) -> SandboxConfig {
        SandboxConfig {
            image: "img".into(),
            layers: vec![layer],
            network: Network::None,
            egress: Default::default(),
            limits: Limits::default(),
            disk: deltafs::Quota::default(),
            template_memory: None,
            env: vec![],
            cwd: "/".into(),
            user: None,
        }
    }

    fn sandbox(id: &str, layer: Digest) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            config: config(layer),
            stack: stack_of("s"),
            origin: None,
            head: None,
            created: 1,
            ports: vec![],
        }
    }

    /// A stack id made from a short name.
    pub fn stack_of(name: &str) -> StackId {
        let n = name.bytes().fold(0u128, |n, b| n << 8 | u128::from(b));
        format!("{n:032x}").parse().unwrap()
    }

    pub fn checkpoint(id: &str, sandbox: &str, parent: Option<&str>) -> CheckpointRecord {
        CheckpointRecord {
            id: id.into(),
            sandbox: sandbox.into(),
            parent: parent.map(String::from),
            stack: stack_of(id),
            kind: CheckpointKind::Filesystem,
            image: None,
            image_written: false,
            durable: true,
            image_failure: None,
            processes: None,
            sessions: vec![],
            config: config(Digest::of(b"c")),
            created: 1,
            pause_ms: 1.0,
            duration_ms: 2.0,
            reset_connections: vec![],
            address: None,
        }
    }

    #[test]
    fn checkpoint_tree_relinks_around_deleted_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        c.put_sandbox(&sandbox("s1", Digest::of(b"a"))).unwrap();
        for (id, parent) in [("c1", None), ("c2", Some("c1")), ("c3", Some("c2")), ("c4", Some("c2"))] {
            c.add_checkpoint(&checkpoint(id, "s1", parent)).unwrap();
        }
        assert_eq!(c.sandbox("s1").unwrap().unwrap().head.as_deref(), Some("c4"));
        c.delete_checkpoints(&["c2".into(), "c4".into()]).unwrap();
        let left: Vec<(String, Option<String>)> =
            c.checkpoints().unwrap().into_iter().map(|k| (k.id, k.parent)).collect();
        assert_eq!(left, [("c1".to_string(), None), ("c3".to_string(), Some("c1".to_string()))]);
        assert_eq!(c.sandbox("s1").unwrap().unwrap().head.as_deref(), Some("c1"));
        assert_eq!(c.referenced_stacks().unwrap(), [stack_of("c1"), stack_of("c3")]);
    }

    #[test]
    fn records_survive_reopening_and_references_are_tracked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        {
            let c = Catalog::open(&path).unwrap();
            let image = ImageRecord {
                name: "img".into(),
                layers: vec![LayerInfo { diff_id: a, size: 10 }],
                config: ImageConfig::default(),
                format: SourceFormat::RootfsDir,
                source: "/x".into(),
                created: 1,
                base_stack: None,
            };
            c.put_image(&image).unwrap();
            c.put_sandbox(&sandbox("s1", b)).unwrap();
            assert!(c.put_sandbox(&sandbox("s1", b)).is_err(), "ids are unique");
        }
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.image("img").unwrap().unwrap().size(), 10);
        assert_eq!(c.referenced_layers().unwrap(), [a, b].into_iter().collect());
        assert!(c.delete_image("img").unwrap());
        assert!(!c.delete_image("img").unwrap());
        assert_eq!(c.referenced_layers().unwrap(), [b].into_iter().collect());
        assert_eq!(c.sandboxes().unwrap().len(), 1);
    }

    #[test]
    fn a_sandbox_recorded_before_networks_had_policies_has_the_defaults() {
        let mut record = serde_json::to_value(sandbox("s1", Digest::of(b"a"))).unwrap();
        let fields = record.as_object_mut().unwrap();
        assert!(fields.remove("egress").is_some() && fields.remove("ports").is_some());
        let read: SandboxRecord = serde_json::from_value(record).unwrap();
        assert_eq!((read.config.egress, read.ports), (Default::default(), vec![]));
    }

    #[test]
    fn a_version_2_catalog_is_migrated_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let old = |id: &str, image: Option<&str>| {
            let mut record = serde_json::to_value(checkpoint(id, "s1", None)).unwrap();
            let fields = record.as_object_mut().unwrap();
            for gone in ["image_written", "pause_ms", "duration_ms"] {
                fields.remove(gone);
            }
            fields.insert("latency_ms".into(), 3.5.into());
            fields.insert("image".into(), image.into());
            record.to_string()
        };
        let (full, filesystem) = (old("c1", Some("0123456789abcdef0123456789abcdef")), old("c2", None));
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0].1).unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
            for (id, record) in [("c1", &full), ("c2", &filesystem)] {
                conn.execute("INSERT INTO checkpoints (id, record) VALUES (?1, ?2)", params![id, record]).unwrap();
            }
        }
        let c = Catalog::open(&path).unwrap();
        let version: i64 = c.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let c1 = c.checkpoint("c1").unwrap().unwrap();
        let c2 = c.checkpoint("c2").unwrap().unwrap();
        // The image a v2 catalog called durable is written; nothing was synced yet.
        assert_eq!((c1.image_written, c1.durable, c1.pause_ms, c1.duration_ms), (true, false, 3.5, 0.0));
        assert_eq!((c2.image_written, c2.durable), (false, false));
        c.mark_durable("c1").unwrap();
        drop(c);
        // Reopening migrates nothing twice: what was recorded since stays.
        assert!(Catalog::open(&path).unwrap().checkpoint("c1").unwrap().unwrap().durable);

        Connection::open(&path).unwrap().pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        let refused = Catalog::open(&path).err().expect("a newer schema is refused");
        assert!(
            matches!(refused, CatalogError::Newer { found, supported } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION)
        );
        assert!(refused.to_string().contains("newer than this deltabox"));
    }
}
