//! Copying whole tables into the database (`vaultgate migrate --from DIR
//! --to URL`, docs/replicas.md#moving-an-install-to-postgresql), and reading
//! them back to verify the copy.
//!
//! An import runs in one transaction under an advisory lock. Each source
//! row is compared with the target's row of the same primary key: equal
//! rows are left alone, missing ones inserted, and a row that differs
//! refuses the whole import ([`PostgresError::Conflict`]) — so running it
//! twice changes nothing, and it never overwrites another install's data.

use std::collections::{BTreeMap, BTreeSet};

use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use vault_core::store::copy::{Cell, ColumnKind, TableRows, TableSpec, describe_key};

use crate::{PostgresError, PostgresStore};

/// The advisory lock key imports hold ("vg-copy!" in ASCII).
const IMPORT_LOCK: i64 = 0x7667_2d63_6f70_7921;

/// How many rows of a table an import found already present or copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableImport {
    /// The table.
    pub table: &'static str,
    /// Rows inserted.
    pub copied: usize,
    /// Rows found equal in the target (left alone).
    pub present: usize,
}

fn pg(what: &str, e: &tokio_postgres::Error) -> PostgresError {
    PostgresError::Backend(format!("{what}: {}", crate::connect::describe(e)))
}

type Param = Box<dyn ToSql + Sync + Send>;

/// A cell as a parameter of the column's type.
fn param(spec: &TableSpec, i: usize, cell: &Cell) -> Result<Param, PostgresError> {
    let column = spec.columns[i];
    let wrong = || {
        PostgresError::Conflict(format!(
            "{}.{} holds a value this schema cannot store",
            spec.name, column.name
        ))
    };
    Ok(match (cell, column.kind) {
        (Cell::Null, ColumnKind::Text) => Box::new(None::<String>),
        (Cell::Null, ColumnKind::BigInt) => Box::new(None::<i64>),
        (Cell::Null, ColumnKind::Int) => Box::new(None::<i32>),
        (Cell::Null, ColumnKind::Bytes) => Box::new(None::<Vec<u8>>),
        (Cell::Null, ColumnKind::Bool) => Box::new(None::<bool>),
        (Cell::Text(s), ColumnKind::Text) => Box::new(s.clone()),
        (Cell::Int(n), ColumnKind::BigInt) => Box::new(*n),
        (Cell::Int(n), ColumnKind::Int) => Box::new(i32::try_from(*n).map_err(|_| wrong())?),
        (Cell::Bytes(b), ColumnKind::Bytes) => Box::new(b.clone()),
        (Cell::Bool(b), ColumnKind::Bool) => Box::new(*b),
        _ => return Err(wrong()),
    })
}

/// Column `i` of a target row as a cell.
fn cell(spec: &TableSpec, row: &Row, i: usize) -> Result<Cell, PostgresError> {
    let wrong = |_| {
        PostgresError::Backend(format!(
            "{}.{} has an unexpected type",
            spec.name, spec.columns[i].name
        ))
    };
    let or_null = |c: Option<Cell>| c.unwrap_or(Cell::Null);
    Ok(match spec.columns[i].kind {
        ColumnKind::Text => or_null(
            row.try_get::<_, Option<String>>(i)
                .map_err(wrong)?
                .map(Cell::Text),
        ),
        ColumnKind::BigInt => or_null(
            row.try_get::<_, Option<i64>>(i)
                .map_err(wrong)?
                .map(Cell::Int),
        ),
        ColumnKind::Int => or_null(
            row.try_get::<_, Option<i32>>(i)
                .map_err(wrong)?
                .map(|n| Cell::Int(i64::from(n))),
        ),
        ColumnKind::Bytes => or_null(
            row.try_get::<_, Option<Vec<u8>>>(i)
                .map_err(wrong)?
                .map(Cell::Bytes),
        ),
        ColumnKind::Bool => or_null(
            row.try_get::<_, Option<bool>>(i)
                .map_err(wrong)?
                .map(Cell::Bool),
        ),
    })
}

fn column_list(spec: &TableSpec) -> String {
    let names: Vec<&str> = spec.columns.iter().map(|c| c.name).collect();
    names.join(", ")
}

/// Every row of `spec`'s table in the target.
async fn read_all<C: GenericClient>(c: &C, spec: TableSpec) -> Result<TableRows, PostgresError> {
    let sql = format!("SELECT {} FROM {}", column_list(&spec), spec.name);
    let rows = c
        .query(&sql, &[])
        .await
        .map_err(|e| pg(&format!("reading {}", spec.name), &e))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let cells: Result<Vec<Cell>, _> = (0..spec.columns.len())
            .map(|i| cell(&spec, row, i))
            .collect();
        out.push(cells?);
    }
    Ok(TableRows::new(spec, out))
}

/// The source rows the target lacks, after checking that every row it has
/// is equal. `present` counts the equal ones.
fn missing<'a>(
    source: &'a TableRows,
    target: &TableRows,
    present: &mut usize,
) -> Result<Vec<&'a [Cell]>, PostgresError> {
    let existing = target.by_key();
    let mut out = Vec::new();
    for row in &source.rows {
        let key = source.key_of(row);
        match existing.get(key) {
            Some(found) if *found == row.as_slice() => *present += 1,
            Some(_) => {
                return Err(PostgresError::Conflict(format!(
                    "the target holds different data for {}",
                    describe_key(&source.spec, key)
                )));
            }
            None => out.push(row.as_slice()),
        }
    }
    Ok(out)
}

/// Keys ordered so that each key's parent comes before it (or is already
/// in the target).
fn parents_first<'a>(rows: Vec<&'a [Cell]>, target: &TableRows) -> Vec<&'a [Cell]> {
    let parent_at = parent_column();
    let mut placed: BTreeSet<Cell> = target.rows.iter().map(|r| r[0].clone()).collect();
    let mut pending = rows;
    let mut ordered = Vec::with_capacity(pending.len());
    loop {
        let before = pending.len();
        let (ready, wait): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .partition(|r| r[parent_at] == Cell::Null || placed.contains(&r[parent_at]));
        for r in &ready {
            placed.insert(r[0].clone());
        }
        ordered.extend(ready);
        pending = wait;
        if pending.is_empty() || pending.len() == before {
            // What is left has a parent nowhere: the insert names it.
            ordered.extend(pending);
            return ordered;
        }
    }
}

/// The position of `parent` among the keys' columns.
fn parent_column() -> usize {
    vault_core::store::copy::KEYS
        .columns
        .iter()
        .position(|c| c.name == "parent")
        .unwrap_or(0)
}

async fn insert(tx: &Transaction<'_>, spec: &TableSpec, row: &[Cell]) -> Result<(), PostgresError> {
    let placeholders: Vec<String> = (1..=spec.columns.len()).map(|i| format!("${i}")).collect();
    // Usage ids are copied, so that a second run finds them.
    let overriding = if spec.name == "usage" {
        " OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    let sql = format!(
        "INSERT INTO {} ({}){overriding} VALUES ({})",
        spec.name,
        column_list(spec),
        placeholders.join(", ")
    );
    let params: Vec<Param> = row
        .iter()
        .enumerate()
        .map(|(i, c)| param(spec, i, c))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as _).collect();
    let st = tx
        .prepare_cached(&sql)
        .await
        .map_err(|e| pg(&format!("preparing {}", spec.name), &e))?;
    tx.execute(&st, &refs).await.map_err(|e| {
        if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
            PostgresError::Conflict(format!(
                "the target already holds {} under another id (a duplicate key hash?)",
                describe_key(spec, &row[..spec.key_len])
            ))
        } else {
            pg(
                &format!("copying {}", describe_key(spec, &row[..spec.key_len])),
                &e,
            )
        }
    })?;
    Ok(())
}

/// A copied carve-out is held on its parent's line, as the store holds it
/// when the child is created.
async fn hold_carve_out(tx: &Transaction<'_>, row: &[Cell]) -> Result<(), PostgresError> {
    let (Cell::Text(parent), Cell::Int(period), Cell::Int(amount)) = (&row[1], &row[2], &row[3])
    else {
        return Err(PostgresError::Conflict(
            "a carve-out has an unexpected shape".to_owned(),
        ));
    };
    tx.execute(
        "INSERT INTO budget_lines (key_id, period_start, reserved) VALUES ($1, $2, $3)
         ON CONFLICT (key_id, period_start) DO UPDATE
         SET reserved = budget_lines.reserved + $3",
        &[parent, period, amount],
    )
    .await
    .map_err(|e| pg("holding a carve-out on its parent's line", &e))?;
    Ok(())
}

impl PostgresStore {
    /// Copies `tables` (from
    /// [`SqliteStore::export_tables`](vault_core::store::SqliteStore::export_tables))
    /// into this database in one transaction: rows the target lacks are
    /// inserted, equal rows left alone, and any row that differs refuses
    /// the whole import ([`PostgresError::Conflict`], nothing written).
    pub async fn import_tables(
        &self,
        tables: &[TableRows],
    ) -> Result<Vec<TableImport>, PostgresError> {
        let mut conn = self.client().await?;
        let tx = conn
            .transaction()
            .await
            .map_err(|e| pg("starting the copy", &e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&IMPORT_LOCK])
            .await
            .map_err(|e| pg("taking the copy lock", &e))?;
        let mut report = Vec::new();
        for source in tables {
            let spec = source.spec;
            let target = read_all(&tx, spec).await?;
            let mut present = 0;
            let mut rows = missing(source, &target, &mut present)?;
            if spec.name == "keys" {
                rows = parents_first(rows, &target);
            }
            for row in &rows {
                insert(&tx, &spec, row).await?;
                if spec.name == "carve_outs" {
                    hold_carve_out(&tx, row).await?;
                }
            }
            if spec.name == "usage" && !rows.is_empty() {
                tx.execute(
                    "SELECT setval(pg_get_serial_sequence('usage', 'id'),
                                   (SELECT MAX(id) FROM usage))",
                    &[],
                )
                .await
                .map_err(|e| pg("moving the usage id sequence", &e))?;
            }
            report.push(TableImport {
                table: spec.name,
                copied: rows.len(),
                present,
            });
        }
        tx.commit()
            .await
            .map_err(|e| pg("committing the copy", &e))?;
        Ok(report)
    }

    /// The target's rows with the primary keys of `source`'s rows, in the
    /// same form and order (to compare checksums after a copy).
    pub async fn rows_like(&self, source: &TableRows) -> Result<TableRows, PostgresError> {
        let conn = self.client().await?;
        let target = read_all(&conn, source.spec).await?;
        let wanted: BTreeMap<&[Cell], ()> =
            source.rows.iter().map(|r| (source.key_of(r), ())).collect();
        let rows = target
            .rows
            .iter()
            .filter(|r| wanted.contains_key(target.key_of(r)))
            .cloned()
            .collect();
        Ok(TableRows::new(source.spec, rows))
    }
}
