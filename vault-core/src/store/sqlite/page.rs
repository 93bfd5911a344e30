//! [`KeyStore::list_keys_page`](crate::store::KeyStore::list_keys_page) in
//! SQL: the same answer as [`page_of`](crate::store::page_of), counting and
//! reading only the rows of the page (indexes of migration 5).

use rusqlite::Connection;
use rusqlite::types::Value;

use super::backend;
use super::rows::{KEY_COLUMNS, count, key_from_row};
use crate::store::{KeyPage, KeyPageQuery, KeyStatusFilter, StoreError};

/// A key whose non-zero `total` budget is spent
/// ([`budget_exhausted`](crate::store::budget_exhausted)): the policy is
/// JSON, its limit dollars rounded to micro-dollars as `Micros::from_usd`
/// rounds them.
const EXHAUSTED: &str = "(CASE WHEN coalesce(json_extract(policy, '$.budget.period'), 'total') = 'total' \
     AND json_extract(policy, '$.budget.limit_usd') > 0 \
     AND spend >= CAST(round(json_extract(policy, '$.budget.limit_usd') * 1000000) AS INTEGER) \
     THEN 1 ELSE 0 END)";

/// `WHERE …` and its parameters for `q`.
fn filter(q: &KeyPageQuery) -> (String, Vec<Value>) {
    let mut clauses: Vec<String> = Vec::new();
    let mut params: Vec<Value> = Vec::new();
    if let Some(p) = &q.project {
        params.push(Value::Text(p.clone()));
        clauses.push(format!("project = ?{}", params.len()));
    }
    if let Some(t) = q.search_text() {
        // lower() folds ASCII letters only, as the reference does.
        params.push(Value::Text(t.to_ascii_lowercase()));
        let lowered = params.len();
        params.push(Value::Text(t.to_owned()));
        let exact = params.len();
        params.push(Value::Integer(
            i64::try_from(t.chars().count()).unwrap_or(i64::MAX),
        ));
        let len = params.len();
        clauses.push(format!(
            "(instr(lower(name), ?{lowered}) > 0 OR substr(prefix, 1, ?{len}) = ?{exact})"
        ));
    }
    if let Some(s) = q.status {
        clauses.push(status_clause(s, q, &mut params));
    }
    let sql = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    (sql, params)
}

fn status_clause(s: KeyStatusFilter, q: &KeyPageQuery, params: &mut Vec<Value>) -> String {
    if s == KeyStatusFilter::Revoked {
        return "status = 'revoked'".to_owned();
    }
    params.push(Value::Integer(q.now.0));
    let now = params.len();
    let usable = format!("status = 'active' AND (expires_at IS NULL OR expires_at > ?{now})");
    match s {
        KeyStatusFilter::BudgetExhausted => format!("{usable} AND {EXHAUSTED} = 1"),
        KeyStatusFilter::Expired => {
            format!("status <> 'revoked' AND (status = 'expired' OR expires_at <= ?{now})")
        }
        _ => format!("{usable} AND {EXHAUSTED} = 0"),
    }
}

/// The page `q` selects, and the total, read in one transaction.
pub(super) fn key_page(c: &Connection, q: &KeyPageQuery) -> Result<KeyPage, StoreError> {
    let (filter, mut params) = filter(q);
    let tx = c.unchecked_transaction().map_err(backend)?;
    let total: i64 = tx
        .prepare_cached(&format!("SELECT count(*) FROM keys {filter}"))
        .and_then(|mut s| s.query_row(rusqlite::params_from_iter(&params), |r| r.get(0)))
        .map_err(backend)?;
    params.push(Value::Integer(count(q.limit)));
    let limit = params.len();
    params.push(Value::Integer(count(q.offset)));
    let offset = params.len();
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM keys {filter} \
         ORDER BY created_at DESC, id DESC LIMIT ?{limit} OFFSET ?{offset}"
    );
    let mut stmt = tx.prepare_cached(&sql).map_err(backend)?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(&params))
        .map_err(backend)?;
    let mut keys = Vec::new();
    while let Some(row) = rows.next().map_err(backend)? {
        keys.push(key_from_row(row)?);
    }
    drop(rows);
    drop(stmt);
    tx.commit().map_err(backend)?;
    Ok(KeyPage {
        keys,
        total: u64::try_from(total).unwrap_or(0),
    })
}
