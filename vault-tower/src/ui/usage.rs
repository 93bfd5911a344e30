//! **Usage**: spend, tokens and requests over time (a server-rendered SVG
//! chart), by key, model and provider, recent calls, and the CSV export of
//! the current filter. The records are those `GET /v1/usage` returns for
//! the same `key_id`, `since` and `until` (the manager's `usage`); the model,
//! provider and status filters narrow them further, on the page and in the
//! CSV alike.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::{CONTENT_DISPOSITION, CONTENT_TYPE, HeaderValue};
use maud::{Markup, html};
use serde::Deserialize;
use vault_core::key::KeyId;
use vault_core::manage::{ManageError, UsageQuery, UsageView};

use super::Ui;
use super::guard::Signed;
use super::layout::{Nav, error_page, html_response, page};

/// The most records a page or an export reads (the API's own maximum).
const MAX_RECORDS: usize = 10_000;
/// Recent calls listed on the page.
const RECENT: usize = 100;

/// The filter, in the query string.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Filter {
    /// A key id.
    key_id: Option<String>,
    /// `1h`, `24h`, `7d`, `30d` or `all` (the page); resolved to `since`.
    range: Option<String>,
    /// The first day shown, `YYYY-MM-DD` in UTC; with `to`, replaces `range`.
    from: Option<String>,
    /// The last day shown, `YYYY-MM-DD` in UTC, included.
    to: Option<String>,
    /// Unix milliseconds, as `/v1/usage` takes it (the CSV link).
    since: Option<i64>,
    /// Unix milliseconds, excluded, as `/v1/usage` takes it (the CSV link).
    until: Option<i64>,
    /// A model name.
    model: Option<String>,
    /// A provider name.
    provider: Option<String>,
    /// `ok` (2xx), `denied` (refused by policy) or `error`.
    status: Option<String>,
    /// `hour` or `day`.
    bucket: Option<String>,
}

fn blank(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Midnight UTC starting the day `YYYY-MM-DD`, in Unix milliseconds.
fn day_start(field: &str, day: &str) -> Result<i64, ManageError> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(day, format)
        .map(|d| d.midnight().assume_utc().unix_timestamp() * 1000)
        .map_err(|_| ManageError::Invalid(format!("{field}: expected a date like 2026-12-05")))
}

impl Filter {
    /// The records' time span `[since, until)` in Unix milliseconds: the
    /// days `from`..=`to` (either may be open), else `since`/`until` as
    /// given, else `range` back from `now_ms`.
    fn span(&self, now_ms: i64) -> Result<(Option<i64>, Option<i64>), ManageError> {
        let (from, to) = (blank(&self.from), blank(&self.to));
        if from.is_some() || to.is_some() {
            let since = from.map(|d| day_start("from", d)).transpose()?;
            let until = to
                .map(|d| day_start("to", d).map(|t| t + 86_400_000))
                .transpose()?;
            if let (Some(s), Some(u)) = (since, until)
                && s >= u
            {
                return Err(ManageError::Invalid(
                    "to: must not be before from".to_owned(),
                ));
            }
            return Ok((since, until));
        }
        if self.since.is_some() || self.until.is_some() {
            return Ok((self.since, self.until));
        }
        Ok((
            match blank(&self.range) {
                Some("1h") => Some(now_ms - 3_600_000),
                Some("7d") => Some(now_ms - 7 * 86_400_000),
                Some("30d") => Some(now_ms - 30 * 86_400_000),
                Some("all") => None,
                _ => Some(now_ms - 86_400_000),
            },
            None,
        ))
    }

    fn keeps(&self, u: &UsageView) -> bool {
        let model = blank(&self.model).is_none_or(|m| u.model.as_deref() == Some(m));
        let provider =
            blank(&self.provider).is_none_or(|p| u.provider.is_some_and(|x| x.as_str() == p));
        let status = match blank(&self.status) {
            Some("ok") => (200..300).contains(&u.status),
            Some("denied") => u.denial.is_some(),
            Some("error") => u.status >= 400 && u.denial.is_none(),
            _ => true,
        };
        model && provider && status
    }
}

/// The records of the filter, newest first, the span `[since, until)`
/// used, and whether the store had more than [`MAX_RECORDS`] to give.
async fn records(
    ui: &Ui,
    signed: &Signed,
    f: &Filter,
) -> Result<(Vec<UsageView>, (Option<i64>, Option<i64>), bool), ManageError> {
    let key_id = match blank(&f.key_id) {
        Some(id) => Some(
            KeyId::parse(id)
                .ok_or_else(|| ManageError::Invalid("key_id: not a key id".to_owned()))?,
        ),
        None => None,
    };
    let (since, until) = f.span(ui.admin.context().clock().now().0)?;
    let q = UsageQuery {
        key_id,
        project: signed.viewing().map(str::to_owned),
        since,
        until,
        limit: Some(MAX_RECORDS),
    };
    let list = ui.admin.manager().usage(&signed.actor, q).await?;
    let capped = list.data.len() >= MAX_RECORDS;
    Ok((
        list.data.into_iter().filter(|u| f.keeps(u)).collect(),
        (since, until),
        capped,
    ))
}

/// Requests, tokens and spend of a group of calls.
#[derive(Debug, Default, Clone, Copy)]
struct Sum {
    requests: u64,
    tokens: u64,
    cost: f64,
}

impl Sum {
    fn add(&mut self, u: &UsageView) {
        self.requests += 1;
        self.tokens += u.tokens_in + u.tokens_out;
        self.cost += u.cost_usd.parse::<f64>().unwrap_or(0.0);
    }
}

fn group_by(data: &[UsageView], key: impl Fn(&UsageView) -> String) -> Vec<(String, Sum)> {
    let mut m: BTreeMap<String, Sum> = BTreeMap::new();
    for u in data {
        m.entry(key(u)).or_default().add(u);
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort_by(|a, b| {
        b.1.cost
            .total_cmp(&a.1.cost)
            .then(b.1.requests.cmp(&a.1.requests))
    });
    v
}

fn sums_table(caption: &str, rows: &[(String, Sum)]) -> Markup {
    html! {
        div.scroll { table {
            caption { (caption) }
            thead { tr { th { "" } th { "Requests" } th { "Tokens" } th { "Spend (USD)" } } }
            tbody { @for (name, s) in rows.iter().take(20) {
                tr { td { (name) } td { (s.requests) } td { (s.tokens) } td { (format!("{:.6}", s.cost)) } }
            } }
        } }
    }
}

/// Most periods the chart draws with empty ones filled in (30 days of
/// hours); a longer span shows only the periods that had calls.
const MAX_FILLED_PERIODS: i64 = 24 * 31;

/// A period's start as the chart labels it: `2026-12-05 16:00` or
/// `2026-12-05`.
fn period_label(start_ms: i64, hourly: bool) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(start_ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let day = format!(
        "{:04}-{:02}-{:02}",
        at.year(),
        u8::from(at.month()),
        at.day()
    );
    if hourly {
        format!("{day} {:02}:00", at.hour())
    } else {
        day
    }
}

/// Spend per hour or day as bars on a time axis: every period from the
/// first call's to the last's has its place, empty ones included; the
/// tallest bar is the largest period.
pub(crate) fn chart(data: &[UsageView], hourly: bool) -> Markup {
    let step: i64 = if hourly { 3_600_000 } else { 86_400_000 };
    let mut periods: BTreeMap<i64, Sum> = BTreeMap::new();
    for u in data {
        let Ok(at) =
            time::OffsetDateTime::parse(&u.at, &time::format_description::well_known::Rfc3339)
        else {
            continue;
        };
        let ms = at.unix_timestamp() * 1000;
        periods.entry(ms - ms.rem_euclid(step)).or_default().add(u);
    }
    if let (Some(&first), Some(&last)) = (periods.keys().next(), periods.keys().next_back())
        && (last - first) / step < MAX_FILLED_PERIODS
    {
        let mut t = first;
        while t < last {
            periods.entry(t).or_default();
            t += step;
        }
    }
    let buckets: BTreeMap<String, Sum> = periods
        .into_iter()
        .map(|(start, sum)| (period_label(start, hourly), sum))
        .collect();
    let max = buckets.values().map(|s| s.cost).fold(0.0_f64, f64::max);
    let n = buckets.len().max(1);
    // At most 40 units wide: a period or two must not fill the chart.
    let bar = (600.0 / n as f64).min(40.0);
    html! {
        figure {
            svg.chart viewBox="0 0 600 170" role="img" aria-label="Spend per period" {
                @for (i, (label, s)) in buckets.iter().enumerate() {
                    @let h = if max > 0.0 { s.cost / max * 140.0 } else { 0.0 };
                    rect x=(format!("{:.1}", i as f64 * bar + 1.0)) y=(format!("{:.1}", 145.0 - h))
                        width=(format!("{:.1}", (bar - 2.0).max(1.0))) height=(format!("{h:.1}")) {
                        title { (label) ": $" (format!("{:.6}", s.cost)) ", " (s.requests) " requests" }
                    }
                }
                line x1="0" y1="145" x2="600" y2="145" {}
                @if let Some(first) = buckets.keys().next() { text x="2" y="162" { (first) } }
                @if let Some(last) = buckets.keys().next_back() { text x="598" y="162" text-anchor="end" { (last) } }
            }
            figcaption { "Spend per " (if hourly { "hour" } else { "day" }) "; the tallest bar is $" (format!("{max:.6}")) "." }
        }
    }
}

/// Recent calls as a table (also on a key's page).
pub(crate) fn calls_table(calls: &[UsageView]) -> Markup {
    html! {
        div.scroll { table {
            thead { tr {
                th { "Time" } th { "Key" } th { "Endpoint" } th { "Model" } th { "Status" }
                th { "Tokens in" } th { "Cached" } th { "Tokens out" } th { "Latency" } th { "Cost (USD)" } th { "Denial" }
            } }
            tbody { @for u in calls.iter().take(RECENT) {
                tr {
                    td { (super::keys::when(Some(&u.at))) }
                    td { a href={"/ui/keys/" (u.key_id.as_str())} { code { (u.key_id.as_str()) } } }
                    td { (u.endpoint) }
                    td { (u.model.as_deref().unwrap_or("—")) }
                    td { (u.status) }
                    td { (u.tokens_in) } td { (u.cached_tokens) } td { (u.tokens_out) }
                    td { (u.latency_ms) " ms" }
                    td { (u.cost_usd) }
                    td { (u.denial.as_deref().unwrap_or("")) }
                }
            } }
        } }
    }
}

fn select(name: &str, label: &str, current: Option<&str>, options: &[(&str, &str)]) -> Markup {
    let id = format!("u-{name}");
    html! {
        div.field {
            label for=(id) { (label) }
            select id=(id) name=(name) {
                @for (v, l) in options { option value=(v) selected[current == Some(*v)] { (l) } }
            }
        }
    }
}

/// `GET /ui/usage`.
pub(crate) async fn show(
    State(ui): State<Arc<Ui>>,
    signed: Signed,
    Query(f): Query<Filter>,
) -> Response {
    let (data, (since, until), capped) = match records(&ui, &signed, &f).await {
        Ok(r) => r,
        Err(e) => return error_page(&signed, &e),
    };
    let mut total = Sum::default();
    data.iter().for_each(|u| total.add(u));
    let hourly = blank(&f.bucket) != Some("day");
    let mut csv = form_urlencoded::Serializer::new(String::new());
    for (k, v) in [
        ("key_id", &f.key_id),
        ("model", &f.model),
        ("provider", &f.provider),
        ("status", &f.status),
    ] {
        if let Some(v) = blank(v) {
            csv.append_pair(k, v);
        }
    }
    if let Some(s) = since {
        csv.append_pair("since", &s.to_string());
    }
    if let Some(u) = until {
        csv.append_pair("until", &u.to_string());
    }
    let csv_href = format!("/ui/usage.csv?{}", csv.finish());
    let body = html! {
        form.filters method="get" action="/ui/usage" {
            div.field { label for="u-key_id" { "Key id" } input #u-key_id name="key_id" type="text" value=[blank(&f.key_id)]; }
            div.field { label for="u-model" { "Model" } input #u-model name="model" type="text" value=[blank(&f.model)]; }
            div.field { label for="u-provider" { "Provider" } input #u-provider name="provider" type="text" value=[blank(&f.provider)]; }
            (select("status", "Status", blank(&f.status), &[("", "All"), ("ok", "Succeeded"), ("denied", "Denied"), ("error", "Failed")]))
            @let dates = blank(&f.from).is_some() || blank(&f.to).is_some();
            (select("range", "Date range", if dates { Some("dates") } else { blank(&f.range) }, &[("24h", "Last 24 hours"), ("1h", "Last hour"), ("7d", "Last 7 days"), ("30d", "Last 30 days"), ("all", "All"), ("dates", "From and To below")]))
            div.field { label for="u-from" { "From (UTC)" } input #u-from name="from" type="date" value=[blank(&f.from)] aria-describedby="u-dates-hint"; }
            div.field { label for="u-to" { "To (UTC)" } input #u-to name="to" type="date" value=[blank(&f.to)] aria-describedby="u-dates-hint"; }
            (select("bucket", "Per", blank(&f.bucket), &[("hour", "hour"), ("day", "day")]))
            button type="submit" { "Filter" }
        }
        p.note #u-dates-hint { "From and To (whole days, UTC, both included) replace the date range when either is set." }
        @if capped {
            p.notice role="status" { "These are the newest " (MAX_RECORDS) " calls of this filter; older ones in the span are not counted. Narrow the dates to see them." }
        }
        p.totals { strong { (total.requests) } " requests · " strong { (total.tokens) } " tokens · " strong { "$" (format!("{:.6}", total.cost)) } " spent" }
        p { a.button href=(csv_href) download="usage.csv" { "Export CSV" } }
        (chart(&data, hourly))
        div.columns {
            (sums_table("Top keys", &group_by(&data, |u| u.key_id.to_string())))
            (sums_table("By model", &group_by(&data, |u| u.model.clone().unwrap_or_else(|| "—".to_owned()))))
            (sums_table("By provider", &group_by(&data, |u| u.provider.map_or("—".to_owned(), |p| p.as_str().to_owned()))))
        }
        h2 { "Recent calls" }
        (calls_table(&data))
    };
    html_response(
        StatusCode::OK,
        page("Usage", Some(&signed), Nav::Usage, body),
    )
}

/// A CSV field: quoted when needed, and a leading `=`, `+`, `-`, `@` made
/// inert so a spreadsheet does not run it as a formula.
fn cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The CSV's columns.
pub(crate) const CSV_HEADER: &str = "at,key_id,project,provider,endpoint,model,status,tokens_in,tokens_out,cached_tokens,cost_usd,latency_ms,denial";

/// `GET /ui/usage.csv`: the filter's records, one line each, newest first.
pub(crate) async fn csv(
    State(ui): State<Arc<Ui>>,
    signed: Signed,
    Query(f): Query<Filter>,
) -> Response {
    let data = match records(&ui, &signed, &f).await {
        Ok((d, ..)) => d,
        Err(e) => return error_page(&signed, &e),
    };
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for u in &data {
        let row = [
            u.at.clone(),
            u.key_id.to_string(),
            u.project.clone(),
            u.provider
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            u.endpoint.clone(),
            u.model.clone().unwrap_or_default(),
            u.status.to_string(),
            u.tokens_in.to_string(),
            u.tokens_out.to_string(),
            u.cached_tokens.to_string(),
            u.cost_usd.clone(),
            u.latency_ms.to_string(),
            u.denial.clone().unwrap_or_default(),
        ];
        out.push_str(&row.iter().map(|c| cell(c)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    let mut r = out.into_response();
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    r.headers_mut().insert(
        CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"usage.csv\""),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_csv_cells_are_quoted_and_inert() {
        assert_eq!(cell("a,b"), "\"a,b\"");
        assert_eq!(cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(cell("gpt-4o"), "gpt-4o");
    }

    fn call_at(at: &str, cost: &str) -> UsageView {
        serde_json::from_value(serde_json::json!({
            "at": at, "key_id": "key_AAAAAAAAAAAAAAAA", "project": "default",
            "provider": "openai", "endpoint": "POST /v1/chat/completions", "model": "gpt-4o-mini",
            "tokens_in": 1, "tokens_out": 1, "cached_tokens": 0, "cache_write_tokens": 0,
            "reasoning_tokens": 0, "audio_tokens": 0, "cost_usd": cost, "settlement": null,
            "latency_ms": 1, "status": 200, "denial": null, "shadow": false
        }))
        .unwrap()
    }

    #[test]
    fn boundary_the_chart_is_a_time_axis_with_empty_periods_in_place() {
        let calls = [
            call_at("2026-12-05T16:59:59.999Z", "0.000003"),
            call_at("2026-12-05T13:00:00.000Z", "0.000001"),
            call_at("2026-12-05T13:30:00.000Z", "0.000001"),
        ];
        let svg = chart(&calls, true).into_string();
        assert_eq!(
            svg.matches("<rect").count(),
            4,
            "13, 14, 15 and 16 o'clock: {svg}"
        );
        assert!(
            svg.contains("2026-12-05 14:00: $0.000000, 0 requests"),
            "{svg}"
        );
        assert!(
            svg.contains("2026-12-05 13:00: $0.000002, 2 requests"),
            "{svg}"
        );
        let daily = chart(&calls, false).into_string();
        assert_eq!(daily.matches("<rect").count(), 1);
        // Beyond a month of hours only the periods with calls are drawn.
        let far = [
            call_at("2026-01-01T00:00:00Z", "0.000001"),
            call_at("2026-12-01T00:00:00Z", "0.000001"),
        ];
        assert_eq!(chart(&far, true).into_string().matches("<rect").count(), 2);
    }

    fn filter(query: &str) -> Filter {
        let uri: http::Uri = format!("/ui/usage?{query}").parse().unwrap();
        Query::<Filter>::try_from_uri(&uri).unwrap().0
    }

    #[test]
    fn boundary_from_and_to_are_whole_utc_days_and_replace_the_range() {
        const DAY: i64 = 86_400_000;
        // 2026-12-05T00:00:00Z.
        let dec5 = 1_796_428_800_000;
        let now = dec5 + 10 * DAY;
        let span = |q: &str| filter(q).span(now);
        assert_eq!(
            span("from=2026-12-05&to=2026-12-06&range=1h").unwrap(),
            (Some(dec5), Some(dec5 + 2 * DAY))
        );
        assert_eq!(span("from=2026-12-05").unwrap(), (Some(dec5), None));
        assert_eq!(span("to=2026-12-05").unwrap(), (None, Some(dec5 + DAY)));
        assert_eq!(
            span("from=2026-12-05&to=2026-12-05").unwrap(),
            (Some(dec5), Some(dec5 + DAY))
        );
        // The CSV link's resolved span, and the presets.
        assert_eq!(span("since=5&until=9").unwrap(), (Some(5), Some(9)));
        assert_eq!(span("range=1h").unwrap(), (Some(now - 3_600_000), None));
        assert_eq!(span("").unwrap(), (Some(now - DAY), None));
        assert_eq!(span("range=all&from=").unwrap(), (None, None));
        for bad in [
            "from=2026-13-01",
            "to=05.12.2026",
            "from=2026-12-06&to=2026-12-05",
        ] {
            let e = span(bad).unwrap_err();
            assert!(matches!(e, ManageError::Invalid(_)), "{bad}: {e:?}");
        }
    }
}
