//! Bulk copies of one stored key, for benchmarks and load tests that need a
//! store holding up to millions of keys: [`KeyStore::insert_key`] commits
//! (and fsyncs) each key on its own, which for a million keys takes hours.
//!
//! [`KeyStore::insert_key`]: crate::store::KeyStore::insert_key

use rusqlite::Transaction;

use super::{Durability, SqliteStore, backend, key_exists};
use crate::key::{KeyHash, KeyId, KeyPrefix};
use crate::store::StoreError;

/// The writer's page cache while copying, in KiB (SQLite's default is 2 MB).
const BULK_CACHE_KIB: i64 = 256 * 1024;

impl SqliteStore {
    /// Copies the stored key `template` once for each `(hash, prefix)` in
    /// `known` and `random` more times with random hashes, in one
    /// transaction, and returns how many keys the store then holds.
    ///
    /// Each copy has a fresh id and no previous hash; every other column is
    /// the template's (policy, project, scopes, status, …). The known copies
    /// are spread evenly among the random ones, so they do not sit together
    /// on a few table pages. Give `known` the hashes of keys made with the
    /// store's [`KeyFormat`](crate::key::KeyFormat) and those keys
    /// authenticate like any other.
    ///
    /// For benchmarks and load tests only: the copies skip the checks of
    /// `insert_key` (a duplicate hash is still refused by the schema) and,
    /// as with any direct store write, nothing is audited.
    #[doc(hidden)]
    pub async fn copy_key_for_bench(
        &self,
        template: &KeyId,
        known: Vec<(KeyHash, KeyPrefix)>,
        random: usize,
    ) -> Result<usize, StoreError> {
        let template = template.clone();
        // Copies are named `<fresh id>_<n>`, so two calls never collide.
        let tag = KeyId::generate().map_err(|e| StoreError::Backend(e.to_string()))?;
        self.write(Durability::Full, move |tx| {
            if !key_exists(tx, template.as_str())? {
                return Err(StoreError::NotFound);
            }
            // Random hashes land all over the hash index: with the default
            // page cache most inserts re-read and re-write a page (1M keys:
            // 23 s, two thirds of it in the kernel, against 13 s).
            let cache: i64 = tx
                .query_row("PRAGMA cache_size", [], |r| r.get(0))
                .map_err(backend)?;
            tx.pragma_update(None, "cache_size", -BULK_CACHE_KIB)
                .map_err(backend)?;
            let copied = copy_rows(tx, &template, &tag, &known, random);
            tx.pragma_update(None, "cache_size", cache)
                .map_err(backend)?;
            copied
        })
        .await
    }
}

/// The copies of [`SqliteStore::copy_key_for_bench`], and the keys then held.
fn copy_rows(
    tx: &Transaction<'_>,
    template: &KeyId,
    tag: &KeyId,
    known: &[(KeyHash, KeyPrefix)],
    random: usize,
) -> Result<usize, StoreError> {
    let copy = Copier::new(tx, template.as_str(), tag.as_str())?;
    let per_known = random / (known.len() + 1);
    let mut next = 0;
    for (i, (hash, prefix)) in known.iter().enumerate() {
        copy.known(&format!("{tag}_k{i}"), hash, prefix)?;
        copy.random(next, per_known)?;
        next += per_known;
    }
    copy.random(next, random - next)?;
    let count: i64 = tx
        .query_row("SELECT count(*) FROM keys", [], |r| r.get(0))
        .map_err(backend)?;
    usize::try_from(count).map_err(|_| StoreError::Corrupt("negative key count".into()))
}

/// The two `INSERT … SELECT` statements that copy the template row, built
/// from the table's own column list so that columns added by later
/// migrations are copied too.
struct Copier<'a> {
    tx: &'a Transaction<'a>,
    template: &'a str,
    tag: &'a str,
    known_sql: String,
    random_sql: String,
}

impl<'a> Copier<'a> {
    fn new(tx: &'a Transaction<'a>, template: &'a str, tag: &'a str) -> Result<Self, StoreError> {
        let columns: Vec<String> = tx
            .prepare("SELECT name FROM pragma_table_info('keys')")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(backend)?;
        let select = |id: &str, hash: &str, prefix: &str| {
            columns
                .iter()
                .map(|c| match c.as_str() {
                    "id" => id.to_owned(),
                    "hash" => hash.to_owned(),
                    "prefix" => prefix.to_owned(),
                    "previous_hash" | "previous_valid_until" => "NULL".to_owned(),
                    other => other.to_owned(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let list = columns.join(", ");
        Ok(Copier {
            tx,
            template,
            tag,
            // ?1 id, ?2 hash, ?3 prefix, ?4 template id.
            known_sql: format!(
                "INSERT INTO keys ({list}) SELECT {} FROM keys WHERE id = ?4",
                select("?1", "?2", "?3")
            ),
            // ?1 tag, ?2 first n, ?3 last n, ?4 template id.
            random_sql: format!(
                "WITH RECURSIVE seq(n) AS (SELECT ?2 UNION ALL SELECT n + 1 FROM seq WHERE n < ?3)
                 INSERT INTO keys ({list})
                 SELECT {} FROM seq, (SELECT * FROM keys WHERE id = ?4)",
                select("?1 || '_' || n", "lower(hex(randomblob(32)))", "prefix")
            ),
        })
    }

    fn known(&self, id: &str, hash: &KeyHash, prefix: &KeyPrefix) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(&self.known_sql)
            .and_then(|mut s| s.execute([id, &hash.to_hex(), prefix.as_str(), self.template]))
            .map(drop)
            .map_err(backend)
    }

    /// `count` copies with random hashes, numbered from `first`.
    fn random(&self, first: usize, count: usize) -> Result<(), StoreError> {
        if count == 0 {
            return Ok(());
        }
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.tx
            .prepare_cached(&self.random_sql)
            .and_then(|mut s| {
                s.execute(rusqlite::params![
                    self.tag,
                    n(first),
                    n(first + count - 1),
                    self.template
                ])
            })
            .map(drop)
            .map_err(backend)
    }
}
