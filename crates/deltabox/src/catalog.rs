//! The daemon's crash-safe catalog: images and sandboxes in SQLite (WAL mode). Every change is one
//! transaction, so after a crash the catalog holds exactly what was committed.

use std::path::Path;

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
}

impl ImageRecord {
    /// Uncompressed size of all layers.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub image: String,
    /// The layers it runs on (kept here so the image may be re-tagged while the sandbox lives).
    pub layers: Vec<Digest>,
    pub network: Network,
    pub limits: Limits,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: Option<String>,
    pub created: i64,
}

pub struct Catalog {
    conn: Connection,
}

const SCHEMA_VERSION: i64 = 1;

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version < SCHEMA_VERSION {
            conn.execute_batch(
                "BEGIN;
                 CREATE TABLE IF NOT EXISTS images (name TEXT PRIMARY KEY, record TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS sandboxes (id TEXT PRIMARY KEY, record TEXT NOT NULL);
                 PRAGMA user_version = 1;
                 COMMIT;",
            )?;
        }
        Ok(Catalog { conn })
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
        let json: Option<String> =
            self.conn.query_row("SELECT record FROM images WHERE name = ?1", [name], |r| r.get(0)).optional()?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
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

    pub fn delete_sandbox(&self, id: &str) -> Result<bool> {
        Ok(self.conn.execute("DELETE FROM sandboxes WHERE id = ?1", [id])? > 0)
    }

    /// Every layer some image or sandbox still needs.
    pub fn referenced_layers(&self) -> Result<std::collections::HashSet<Digest>> {
        let mut used: std::collections::HashSet<Digest> =
            self.images()?.into_iter().flat_map(|i| i.layers.into_iter().map(|l| l.diff_id)).collect();
        used.extend(self.sandboxes()?.into_iter().flat_map(|s| s.layers));
        Ok(used)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str, layer: Digest) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            image: "img".into(),
            layers: vec![layer],
            network: Network::None,
            limits: Limits::default(),
            env: vec![],
            cwd: "/".into(),
            user: None,
            created: 1,
        }
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
}
