//! [`KeyStore::list_keys_page`](crate::store::KeyStore::list_keys_page) in
//! SQL: the same answer as [`page_of`](crate::store::page_of), reading only
//! the page's rows (indexes of migration 5); a search or status filter is
//! evaluated once on each row of the project.

use rusqlite::Connection;
use rusqlite::types::Value;

use super::backend;
use super::rows::{KEY_COLUMNS, count, key_from_row};
use crate::record::KeyRecord;
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
        // LIKE folds ASCII letters only, as the reference does.
        params.push(Value::Text(format!("%{}%", escape_like(t))));
        let pattern = params.len();
        params.push(Value::Text(t.to_owned()));
        let exact = params.len();
        params.push(Value::Integer(
            i64::try_from(t.chars().count()).unwrap_or(i64::MAX),
        ));
        let len = params.len();
        clauses.push(format!(
            "(name LIKE ?{pattern} ESCAPE '\\' OR substr(prefix, 1, ?{len}) = ?{exact})"
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

/// `t` with LIKE's wildcards and escape character escaped.
fn escape_like(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    for c in t.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
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

/// The count query, the page query, and their parameters (the page's
/// are the count's plus `LIMIT` and `OFFSET`).
fn statements(q: &KeyPageQuery) -> (String, String, Vec<Value>) {
    let (filter, mut params) = filter(q);
    let count_sql = format!("SELECT count(*) FROM keys {filter}");
    params.push(Value::Integer(count(q.limit)));
    let limit = params.len();
    params.push(Value::Integer(count(q.offset)));
    let offset = params.len();
    let page_sql = format!(
        "SELECT {KEY_COLUMNS} FROM keys {filter} \
         ORDER BY created_at DESC, id DESC LIMIT ?{limit} OFFSET ?{offset}"
    );
    (count_sql, page_sql, params)
}

/// The page `q` selects, and the total, read in one transaction.
pub(super) fn key_page(c: &Connection, q: &KeyPageQuery) -> Result<KeyPage, StoreError> {
    let tx = c.unchecked_transaction().map_err(backend)?;
    let page = if q.search_text().is_some() || q.status.is_some() {
        filtered_page(&tx, q)?
    } else {
        whole_page(&tx, q)?
    };
    tx.commit().map_err(backend)?;
    Ok(page)
}

/// Without a search or status: the total is counted from the index alone,
/// then the page's rows are read.
fn whole_page(c: &Connection, q: &KeyPageQuery) -> Result<KeyPage, StoreError> {
    let (count_sql, page_sql, params) = statements(q);
    let total: i64 = c
        .prepare_cached(&count_sql)
        .and_then(|mut s| {
            s.query_row(
                rusqlite::params_from_iter(&params[..params.len() - 2]),
                |r| r.get(0),
            )
        })
        .map_err(backend)?;
    let keys = read_keys(c, &page_sql, rusqlite::params_from_iter(&params))?;
    Ok(KeyPage {
        keys,
        total: u64::try_from(total).unwrap_or(0),
    })
}

/// With a search or status, evaluated on every row of the project: one
/// pass over the matching rows' ids in page order counts them and keeps
/// the page's, whose rows are then read (one evaluation per row, not two).
fn filtered_page(c: &Connection, q: &KeyPageQuery) -> Result<KeyPage, StoreError> {
    let (filter, params) = filter(q);
    let sql = format!("SELECT rowid FROM keys {filter} ORDER BY created_at DESC, id DESC");
    let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(&params))
        .map_err(backend)?;
    let (mut total, mut page) = (0u64, Vec::new());
    let end = q.offset.saturating_add(q.limit);
    while let Some(row) = rows.next().map_err(backend)? {
        if (q.offset..end).contains(&total) {
            page.push(Value::Integer(row.get::<_, i64>(0).map_err(backend)?));
        }
        total += 1;
    }
    let mut keys = Vec::with_capacity(page.len());
    // The page is at most MAX_PAGE_LIMIT rows: one lookup each, in order.
    let one = format!("SELECT {KEY_COLUMNS} FROM keys WHERE rowid = ?1");
    for rowid in page {
        keys.extend(read_keys(c, &one, [rowid])?);
    }
    Ok(KeyPage { keys, total })
}

fn read_keys<P: rusqlite::Params>(
    c: &Connection,
    sql: &str,
    params: P,
) -> Result<Vec<KeyRecord>, StoreError> {
    let mut stmt = c.prepare_cached(sql).map_err(backend)?;
    let mut rows = stmt.query(params).map_err(backend)?;
    let mut keys = Vec::new();
    while let Some(row) = rows.next().map_err(backend)? {
        keys.push(key_from_row(row)?);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::UnixMillis;

    /// A page walks the `(project, created_at, id)` index (or the
    /// `(created_at, id)` one across projects) in its order: no sort.
    #[test]
    fn pages_walk_an_index_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open_in_dir(dir.path()).unwrap();
        let conn = Connection::open(store.path()).unwrap();
        for (project, index) in [
            (Some("alpha"), "keys_by_project_newest"),
            (None, "keys_by_created"),
        ] {
            let q = KeyPageQuery {
                project: project.map(str::to_owned),
                search: None,
                status: None,
                now: UnixMillis(0),
                offset: 0,
                limit: 50,
            };
            let (_, sql, params) = statements(&q);
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let plan: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(&params), |r| r.get(3))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let plan = plan.join("\n");
            assert!(plan.contains(index), "{sql}: {plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{sql} sorts: {plan}");
        }
    }
}
