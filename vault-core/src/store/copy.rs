//! Whole tables in a backend-neutral form, for copying one install into
//! another (`vaultgate migrate --from DIR --to URL`,
//! docs/replicas.md#moving-an-install-to-postgresql).
//!
//! [`TABLES`] names what is copied, column by column, in the PostgreSQL
//! schema's names: keys (hashes, never keys), provider keys (ciphertext as
//! stored), budget lines' settled spend, carve-outs, usage records and
//! metadata (the master-key check value). Reservations are not copied:
//! they belong to calls in flight, and no server may run during a copy.
//!
//! [`SqliteStore::export_tables`](crate::store::SqliteStore::export_tables)
//! reads them; a target backend writes and reads them back, and
//! [`TableRows::checksum`] compares the two.

use std::collections::BTreeMap;

use self::ColumnKind::{BigInt, Bool, Bytes, Int, Text};

/// How a column is typed (in PostgreSQL's terms; SQLite stores integers
/// and booleans as `INTEGER`).
/// Closed on purpose: every backend that copies tables matches all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// Text (`TEXT`).
    Text,
    /// A 64-bit integer (`BIGINT`).
    BigInt,
    /// A 32-bit integer (`INTEGER`).
    Int,
    /// Bytes (`BYTEA`, SQLite `BLOB`).
    Bytes,
    /// A boolean (`BOOLEAN`, SQLite `INTEGER` 0 or 1).
    Bool,
}

/// One column of a copied table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// Its name in the PostgreSQL schema.
    pub name: &'static str,
    /// Its type.
    pub kind: ColumnKind,
}

/// One value. Ordered so rows sort by primary key the same way everywhere.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cell {
    /// SQL `NULL`.
    Null,
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// Text.
    Text(String),
    /// Bytes (sealed provider keys: ciphertext, never a secret in clear).
    Bytes(Vec<u8>),
}

/// A table that is copied: its name, columns, and how many leading columns
/// form its primary key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSpec {
    /// Its name in the PostgreSQL schema.
    pub name: &'static str,
    /// Its columns, primary key first.
    pub columns: &'static [Column],
    /// How many leading columns form the primary key.
    pub key_len: usize,
}

const fn col(name: &'static str, kind: ColumnKind) -> Column {
    Column { name, kind }
}

/// Virtual keys: hashes, previous hashes, policies, parents, status, spend
/// and counters.
pub const KEYS: TableSpec = TableSpec {
    name: "keys",
    key_len: 1,
    columns: &[
        col("id", Text),
        col("hash", Text),
        col("prefix", Text),
        col("previous_hash", Text),
        col("previous_valid_until", BigInt),
        col("name", Text),
        col("project", Text),
        col("env", Text),
        col("scopes", Text),
        col("plan", Text),
        col("policy", Text),
        col("parent", Text),
        col("provider_keys", Text),
        col("created_at", BigInt),
        col("expires_at", BigInt),
        col("last_used_at", BigInt),
        col("request_count", BigInt),
        col("status", Text),
        col("revoked_at", BigInt),
        col("spend", BigInt),
    ],
};

/// Provider keys, sealed: the ciphertext is copied as stored.
pub const PROVIDER_KEYS: TableSpec = TableSpec {
    name: "provider_keys",
    key_len: 1,
    columns: &[
        col("id", Text),
        col("project", Text),
        col("provider", Text),
        col("name", Text),
        col("sealed", Bytes),
        col("hint", Text),
        col("created_at", BigInt),
    ],
};

/// Budget lines: what each (key, period) has settled.
pub const BUDGET_LINES: TableSpec = TableSpec {
    name: "budget_lines",
    key_len: 2,
    columns: &[
        col("key_id", Text),
        col("period_start", BigInt),
        col("settled", BigInt),
    ],
};

/// Carve-outs of child keys on their parents' lines; `chargeable` is
/// `NULL` while one is open.
pub const CARVE_OUTS: TableSpec = TableSpec {
    name: "carve_outs",
    key_len: 1,
    columns: &[
        col("child_id", Text),
        col("parent_id", Text),
        col("period_start", BigInt),
        col("amount", BigInt),
        col("chargeable", BigInt),
    ],
};

/// Usage records, with their ids.
pub const USAGE: TableSpec = TableSpec {
    name: "usage",
    key_len: 1,
    columns: &[
        col("id", BigInt),
        col("at", BigInt),
        col("key_id", Text),
        col("project", Text),
        col("provider", Text),
        col("endpoint", Text),
        col("model", Text),
        col("tokens_in", BigInt),
        col("tokens_out", BigInt),
        col("cost", BigInt),
        col("latency_ms", BigInt),
        col("status", Int),
        col("denial", Text),
        col("shadow", Bool),
        col("cached_tokens", BigInt),
        col("cache_write_tokens", BigInt),
        col("reasoning_tokens", BigInt),
        col("audio_tokens", BigInt),
        col("settlement", Text),
    ],
};

/// Metadata: the master-key check value and the like.
pub const META: TableSpec = TableSpec {
    name: "meta",
    key_len: 1,
    columns: &[col("name", Text), col("value", Text)],
};

/// Every copied table, in an order that satisfies foreign keys (a key's
/// parent is copied before it within `keys`: targets order those rows).
pub const TABLES: &[TableSpec] = &[KEYS, PROVIDER_KEYS, BUDGET_LINES, CARVE_OUTS, USAGE, META];

/// The rows of one table, sorted by primary key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRows {
    /// Which table.
    pub spec: TableSpec,
    /// Its rows, each with one cell per column, sorted by primary key.
    pub rows: Vec<Vec<Cell>>,
}

impl TableRows {
    /// `rows` of `spec`, sorted by primary key.
    pub fn new(spec: TableSpec, mut rows: Vec<Vec<Cell>>) -> Self {
        rows.sort_by(|a, b| a[..spec.key_len].cmp(&b[..spec.key_len]));
        TableRows { spec, rows }
    }

    /// A row's primary key.
    pub fn key_of<'a>(&self, row: &'a [Cell]) -> &'a [Cell] {
        &row[..self.spec.key_len.min(row.len())]
    }

    /// The rows by primary key.
    pub fn by_key(&self) -> BTreeMap<&[Cell], &[Cell]> {
        self.rows
            .iter()
            .map(|r| (self.key_of(r), r.as_slice()))
            .collect()
    }

    /// Hex SHA-256 over every row in order, each cell tagged and
    /// length-prefixed: equal exactly when the rows are.
    pub fn checksum(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for row in &self.rows {
            ctx.update(&(row.len() as u64).to_be_bytes());
            for cell in row {
                let (tag, bytes): (u8, Vec<u8>) = match cell {
                    Cell::Null => (0, Vec::new()),
                    Cell::Int(i) => (1, i.to_be_bytes().to_vec()),
                    Cell::Bool(b) => (2, vec![u8::from(*b)]),
                    Cell::Text(s) => (3, s.as_bytes().to_vec()),
                    Cell::Bytes(b) => (4, b.clone()),
                };
                ctx.update(&[tag]);
                ctx.update(&(bytes.len() as u64).to_be_bytes());
                ctx.update(&bytes);
            }
        }
        hex::encode(ctx.finish())
    }
}

/// A name for a row in messages: its table and primary key (ids and
/// periods only; no copied column is a secret).
pub fn describe_key(spec: &TableSpec, key: &[Cell]) -> String {
    let parts: Vec<String> = key
        .iter()
        .map(|c| match c {
            Cell::Null => "null".to_owned(),
            Cell::Int(i) => i.to_string(),
            Cell::Bool(b) => b.to_string(),
            Cell::Text(s) => s.clone(),
            Cell::Bytes(_) => "<bytes>".to_owned(),
        })
        .collect();
    format!("{} {}", spec.name, parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_checksum_tells_cells_apart() {
        let a = TableRows::new(
            META,
            vec![vec![Cell::Text("ab".into()), Cell::Text("c".into())]],
        );
        let b = TableRows::new(
            META,
            vec![vec![Cell::Text("a".into()), Cell::Text("bc".into())]],
        );
        assert_ne!(a.checksum(), b.checksum());
        let n = TableRows::new(META, vec![vec![Cell::Text("a".into()), Cell::Null]]);
        let e = TableRows::new(
            META,
            vec![vec![Cell::Text("a".into()), Cell::Text(String::new())]],
        );
        assert_ne!(n.checksum(), e.checksum());
    }

    #[test]
    fn boundary_rows_sort_by_primary_key() {
        let t = TableRows::new(
            BUDGET_LINES,
            vec![
                vec![Cell::Text("k".into()), Cell::Int(2), Cell::Int(0)],
                vec![Cell::Text("k".into()), Cell::Int(1), Cell::Int(5)],
            ],
        );
        assert_eq!(t.rows[0][1], Cell::Int(1));
        assert_eq!(t.by_key().len(), 2);
    }
}
