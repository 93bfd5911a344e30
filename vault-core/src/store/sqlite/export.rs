//! Reading every copied table at once (`vaultgate migrate --from`,
//! docs/replicas.md#moving-an-install-to-postgresql), in the neutral form
//! of [`store::copy`](crate::store::copy).

use rusqlite::Connection;
use rusqlite::types::ValueRef;

use super::{SqliteStore, backend};
use crate::store::StoreError;
use crate::store::copy::{
    BUDGET_LINES, CARVE_OUTS, Cell, ColumnKind, KEYS, META, PROVIDER_KEYS, TableRows, TableSpec,
    USAGE,
};

/// The query reading `spec`'s columns, in order, from this schema.
fn query(spec: &TableSpec) -> String {
    let cols: Vec<&str> = spec.columns.iter().map(|c| c.name).collect();
    match spec.name {
        // SQLite keeps settled spend alone and closed carve-outs' chargeable
        // amounts in a table of their own.
        "budget_lines" => "SELECT key_id, period_start, settled FROM budget_settled".to_owned(),
        "carve_outs" => "SELECT c.child_id, c.parent_id, c.period_start, c.amount, cc.chargeable \
             FROM carve_outs c LEFT JOIN closed_carve_outs cc ON cc.child_id = c.child_id"
            .to_owned(),
        name => format!("SELECT {} FROM {name}", cols.join(", ")),
    }
}

fn cell(value: ValueRef<'_>, kind: ColumnKind) -> Option<Cell> {
    Some(match (value, kind) {
        (ValueRef::Null, _) => Cell::Null,
        (ValueRef::Integer(i), ColumnKind::BigInt | ColumnKind::Int) => Cell::Int(i),
        (ValueRef::Integer(i), ColumnKind::Bool) => Cell::Bool(i != 0),
        (ValueRef::Text(t), ColumnKind::Text) => {
            Cell::Text(std::str::from_utf8(t).ok()?.to_owned())
        }
        (ValueRef::Blob(b), ColumnKind::Bytes) => Cell::Bytes(b.to_vec()),
        _ => return None,
    })
}

fn read_table(conn: &Connection, spec: TableSpec) -> Result<TableRows, StoreError> {
    let mut st = conn.prepare(&query(&spec)).map_err(backend)?;
    let mut rows = st.query([]).map_err(backend)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(backend)? {
        let mut cells = Vec::with_capacity(spec.columns.len());
        for (i, c) in spec.columns.iter().enumerate() {
            let value = row.get_ref(i).map_err(backend)?;
            let cell = cell(value, c.kind).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "{}.{} has a value of the wrong type",
                    spec.name, c.name
                ))
            })?;
            cells.push(cell);
        }
        out.push(cells);
    }
    Ok(TableRows::new(spec, out))
}

impl SqliteStore {
    /// Every table `vaultgate migrate` copies ([`copy::TABLES`]), read in
    /// one transaction (one consistent snapshot), each sorted by primary
    /// key.
    ///
    /// [`copy::TABLES`]: crate::store::copy::TABLES
    pub async fn export_tables(&self) -> Result<Vec<TableRows>, StoreError> {
        self.read(|conn| {
            conn.execute_batch("BEGIN DEFERRED").map_err(backend)?;
            let result = [KEYS, PROVIDER_KEYS, BUDGET_LINES, CARVE_OUTS, USAGE, META]
                .into_iter()
                .map(|spec| read_table(conn, spec))
                .collect();
            conn.execute_batch("COMMIT").map_err(backend)?;
            result
        })
        .await
    }
}
