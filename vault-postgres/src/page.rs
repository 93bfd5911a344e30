//! [`KeyStore::list_keys_page`](vault_core::store::KeyStore::list_keys_page) in SQL: the same answer as
//! [`page_of`](vault_core::store::page_of), counting and reading only the
//! rows of the page (indexes of migration 4).

use tokio_postgres::IsolationLevel;
use tokio_postgres::types::ToSql;
use vault_core::store::{KeyPage, KeyPageQuery, KeyStatusFilter};

use crate::PostgresStore;
use crate::rows::{KEY_COLUMNS, count, key_from_row};
use crate::store::Fail;

/// A key whose non-zero `total` budget is spent
/// ([`budget_exhausted`](vault_core::store::budget_exhausted)): the policy
/// is JSON text, its limit dollars rounded to micro-dollars as
/// `Micros::from_usd` rounds them.
const EXHAUSTED: &str = "COALESCE(COALESCE(policy::jsonb #>> '{budget,period}', 'total') = 'total' \
     AND (policy::jsonb #>> '{budget,limit_usd}')::numeric > 0 \
     AND spend >= round((policy::jsonb #>> '{budget,limit_usd}')::numeric * 1000000), false)";

/// ASCII letters folded to lowercase, nothing else (as the reference does).
const FOLDED_NAME: &str =
    "translate(name, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')";

/// A query parameter.
type Param = Box<dyn ToSql + Sync + Send>;

/// `WHERE …` and its parameters for `q`.
fn filter(q: &KeyPageQuery) -> (String, Vec<Param>) {
    let mut clauses: Vec<String> = Vec::new();
    let mut params: Vec<Param> = Vec::new();
    if let Some(p) = &q.project {
        params.push(Box::new(p.clone()));
        clauses.push(format!("project = ${}", params.len()));
    }
    if let Some(t) = q.search_text() {
        params.push(Box::new(t.to_ascii_lowercase()));
        let lowered = params.len();
        params.push(Box::new(t.to_owned()));
        let exact = params.len();
        clauses.push(format!(
            "(strpos({FOLDED_NAME}, ${lowered}) > 0 OR starts_with(prefix, ${exact}))"
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

fn status_clause(s: KeyStatusFilter, q: &KeyPageQuery, params: &mut Vec<Param>) -> String {
    if s == KeyStatusFilter::Revoked {
        return "status = 'revoked'".to_owned();
    }
    params.push(Box::new(q.now.0));
    let now = params.len();
    let usable = format!("status = 'active' AND (expires_at IS NULL OR expires_at > ${now})");
    match s {
        KeyStatusFilter::BudgetExhausted => format!("{usable} AND {EXHAUSTED}"),
        KeyStatusFilter::Expired => {
            format!("status <> 'revoked' AND (status = 'expired' OR expires_at <= ${now})")
        }
        _ => format!("{usable} AND NOT {EXHAUSTED}"),
    }
}

impl PostgresStore {
    /// The page `q` selects and the total, read in one repeatable-read
    /// transaction (one snapshot).
    pub(crate) async fn key_page(&self, q: &KeyPageQuery) -> Result<KeyPage, Fail> {
        let (filter, mut params) = filter(q);
        let mut conn = self.conn().await?;
        let tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as _).collect();
        let st = tx
            .prepare_cached(&format!("SELECT count(*) FROM keys {filter}"))
            .await?;
        let total: i64 = tx.query_one(&st, &refs).await?.try_get(0)?;
        params.push(Box::new(count(q.limit)));
        let limit = params.len();
        params.push(Box::new(count(q.offset)));
        let offset = params.len();
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as _).collect();
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys {filter} \
             ORDER BY created_at DESC, id DESC LIMIT ${limit} OFFSET ${offset}"
        );
        let st = tx.prepare_cached(&sql).await?;
        let rows = tx.query(&st, &refs).await?;
        tx.commit().await?;
        let keys = rows.iter().map(key_from_row).collect::<Result<_, _>>()?;
        Ok(KeyPage {
            keys,
            total: u64::try_from(total).unwrap_or(0),
        })
    }
}
