//! The dashboard in a real browser (docs/dashboard.md#tests): headless
//! Chromium driven over WebDriver (Debian's `chromium` and
//! `chromium-driver`) against the real `vaultgate serve`.
//!
//! Without Chromium the suite prints SKIPPED and passes, except under
//! `CI=true`, where it fails. With `VAULTGATE_SCREENSHOTS=DIR` each page is
//! saved there as a PNG (`scripts/ui-tests` writes docs/screenshots/).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::{
    Req, Resp, Server, chat, cli, create_key, csrf_of, send, tempdir, ui_form, ui_sign_in,
};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session; both end on drop.
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    shots: Option<PathBuf>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Close the session (chromedriver then ends Chromium), with plain
        // blocking I/O: this runs during a panic too.
        if let Ok(mut s) = std::net::TcpStream::connect(self.addr) {
            use std::io::{Read as _, Write as _};
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                s,
                "DELETE /session/{} HTTP/1.1\r\nhost: {}\r\ncontent-length: 0\r\n\r\n",
                self.session, self.addr
            );
            let _ = s.read(&mut [0u8; 1024]);
        }
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium; `None` when either is
    /// not installed.
    async fn start() -> Option<Browser> {
        if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
            return None;
        }
        let port = free_port();
        // Its own process group: dropping the browser ends chromedriver
        // and every Chromium process it started.
        let driver = Command::new(CHROMEDRIVER)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions"
            ]}
        }}});
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
            shots: std::env::var_os("VAULTGATE_SCREENSHOTS").map(PathBuf::from),
        };
        let r = b.call("POST", "/session", Some(caps)).await;
        b.session = r["sessionId"].as_str().expect("a session").to_owned();
        Some(b)
    }

    /// One WebDriver command; its `value`.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let r = self.raw(method, path, body).await;
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        r.json()["value"].clone()
    }

    /// One request to chromedriver, read by its Content-Length
    /// (chromedriver keeps the connection open after answering).
    async fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let full = if path == "/session" {
            path.to_owned()
        } else {
            format!("/session/{}{path}", self.session)
        };
        let body = match method {
            "GET" | "DELETE" => String::new(),
            _ => body.unwrap_or_else(|| json!({})).to_string(),
        };
        let head = format!(
            "{method} {full} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if raw.len() >= end + 4 + len {
                    raw.truncate(end + 4 + len);
                    return support::parse_response(&raw, false);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, stream.read(&mut buf))
                .await
                .expect("chromedriver answers within 120 s")
                .unwrap();
            assert!(n > 0, "chromedriver closed the connection");
            raw.extend_from_slice(&buf[..n]);
        }
    }

    async fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({"url": url}))).await;
    }

    async fn url(&self) -> String {
        self.call("GET", "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call("POST", &format!("/element/{e}/click"), None)
            .await;
    }

    async fn type_in(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call("POST", &format!("/element/{e}/clear"), None)
            .await;
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    async fn source(&self) -> String {
        self.call("GET", "/source", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Whether a JavaScript dialog (alert) is open.
    async fn alert_open(&self) -> bool {
        self.raw("GET", "/alert/text", None).await.status == 200
    }

    async fn cookies(&self) -> Value {
        self.call("GET", "/cookie", None).await
    }

    async fn resize(&self, width: u32, height: u32) {
        self.call(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// Saves a screenshot as `name.png` when screenshots are asked for.
    async fn shot(&self, name: &str) {
        let Some(dir) = &self.shots else { return };
        let v = self.call("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

/// Starts the browser, or says SKIPPED (a failure under `CI=true`).
async fn browser() -> Option<Browser> {
    match Browser::start().await {
        Some(b) => Some(b),
        None => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "Chromium or chromedriver is missing ({CHROMIUM}, {CHROMEDRIVER}); under CI=true the browser suite must run"
            );
            eprintln!(
                "\n*** SKIPPED: dashboard browser tests: install chromium and chromium-driver ***\n"
            );
            None
        }
    }
}

/// Waits (up to 10 s) until the page's HTML contains `needle`.
async fn wait_text(b: &Browser, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let src = b.source().await;
        if src.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} on {}: {src}",
            b.url().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (up to 10 s) until the URL ends with `suffix`.
async fn wait_url(b: &Browser, suffix: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let url = b.url().await;
        if url.ends_with(suffix) {
            return;
        }
        assert!(Instant::now() < deadline, "at {url}, not {suffix}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The key on an issued-key page.
async fn shown_key(b: &Browser) -> String {
    wait_text(b, "id=\"new-key\"").await;
    let v = b
        .js("var e = document.getElementById('new-key'); return e ? e.textContent : null;")
        .await;
    match v.as_str() {
        Some(k) => k.to_owned(),
        None => panic!("no key shown on {}: {}", b.url().await, b.source().await),
    }
}

/// Signs in through the form with `key`.
async fn sign_in(b: &Browser, base: &str, key: &str) {
    b.goto(&format!("{base}/ui/")).await;
    assert!(b.url().await.ends_with("/ui/sign-in"));
    b.type_in("#api_key", key).await;
    b.click("form button[type=submit]").await;
}

/// Everything of the browser's state that could hold a secret: the DOM,
/// both storages and the cookies.
async fn browser_state(b: &Browser) -> String {
    let storage = b
        .js("return JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage), document.cookie]);")
        .await;
    format!("{}\n{}\n{}", b.source().await, storage, b.cookies().await)
}

/// The session cookie's value, read through WebDriver (script cannot).
async fn session_cookie(b: &Browser) -> String {
    let cookies = b.cookies().await;
    let c = cookies
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "vg_session")
        .expect("a session cookie")
        .clone();
    c["value"].as_str().unwrap().to_owned()
}

/// A form post as another page would send it, with the session cookie.
async fn forged_post(
    addr: SocketAddr,
    path: &str,
    cookie: &str,
    origin: Option<&str>,
    body: &str,
) -> Resp {
    let mut req = Req::new("POST", path)
        .header("cookie", &format!("vg_session={cookie}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .raw(body.as_bytes().to_vec());
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    send(addr, req).await
}

async fn key_count(addr: SocketAddr, admin: &str) -> usize {
    support::get(addr, "/v1/keys", admin).await.json()["data"]
        .as_array()
        .unwrap()
        .len()
}

/// The walkthrough of docs/dashboard.md#tests, in one browser session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    let Some(b) = browser().await else { return };
    let dir = tempdir();
    let server = Server::start(dir.path());
    let (addr, base, admin) = (server.addr, server.url(), server.admin().to_owned());

    // Sign in (the sign-in page first, for the README).
    b.goto(&format!("{base}/ui/sign-in")).await;
    b.shot("sign-in").await;
    sign_in(&b, &base, &admin).await;
    wait_url(&b, "/ui/keys").await;
    let cookie = b.cookies().await[0].clone();
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    assert_eq!(cookie["path"], "/ui", "{cookie}");
    assert_eq!(b.js("return document.cookie;").await, "", "HttpOnly");
    b.shot("api-keys").await;

    // Create API Key through the dialog.
    b.click("a[data-dialog=create-key]").await;
    assert_eq!(
        b.js("return document.getElementById('create-key').open;")
            .await,
        true
    );
    b.type_in("#create-key #f-name", "browser-made").await;
    b.js("document.querySelector('#create-key #f-env').value = 'test';")
        .await;
    b.shot("create-api-key").await;
    b.click("#create-key button.primary").await;
    let key = shown_key(&b).await;
    assert!(key.starts_with("vpx_test_"), "{key}");
    wait_text(&b, "Copy it now — you won't see it again").await;
    // The screenshot shows the page, not the secret.
    b.js("document.getElementById('new-key').textContent = 'vpx_test_•••• (shown once)';")
        .await;
    b.shot("key-created").await;
    let r = chat(addr, &key, "gpt-4o-mini").await;
    assert_eq!(
        r.status,
        200,
        "the shown key makes a proxied call: {}",
        r.text()
    );

    // After the dialog closes the key is nowhere.
    b.click("a[data-done]").await;
    wait_url(&b, "/ui/keys").await;
    let id = support::get(addr, "/v1/keys", &admin).await.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "browser-made")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut seen = browser_state(&b).await;
    for page in [
        "/ui/keys",
        "/ui/vault",
        "/ui/usage",
        "/ui/audit",
        &format!("/ui/keys/{id}"),
    ] {
        b.goto(&format!("{base}{page}")).await;
        seen.push_str(&browser_state(&b).await);
    }
    assert!(seen.contains(&id));
    support::assert_absent(
        "the new key in the browser",
        &seen,
        &support::encodings(&key),
    );
    let logs = format!("{}{}", server.stdout.text(), server.stderr.text());
    support::assert_absent(
        "the new key in the server's logs",
        &logs,
        &support::encodings(&key),
    );

    b.goto(&format!("{base}/ui/audit")).await;
    wait_text(&b, "Chain verified").await;
    b.shot("audit").await;

    // Usage shows that call with its cost; the CSV equals /v1/usage.
    b.goto(&format!("{base}/ui/usage")).await;
    let usage = b.source().await;
    assert!(usage.contains(&id), "the call appears on Usage");
    let listed = support::get(addr, &format!("/v1/usage?key_id={id}"), &admin)
        .await
        .json();
    let cost = listed["data"][0]["cost_usd"].as_str().unwrap().to_owned();
    assert!(usage.contains(&cost), "its cost {cost}");
    b.shot("usage").await;
    let href = b
        .js("return document.querySelector('a[download]').getAttribute('href');")
        .await;
    let href = href.as_str().unwrap().replace("&amp;", "&");
    let session = session_cookie(&b).await;
    let csv = send(
        addr,
        Req::new("GET", &href).header("cookie", &format!("vg_session={session}")),
    )
    .await;
    assert_eq!(csv.status, 200);
    let since = href.split("since=").nth(1).unwrap();
    let api = support::get(
        addr,
        &format!("/v1/usage?since={since}&limit=10000"),
        &admin,
    )
    .await
    .json();
    let lines: Vec<String> = csv.text().lines().skip(1).map(str::to_owned).collect();
    let rows = api["data"].as_array().unwrap();
    assert_eq!(lines.len(), rows.len(), "{}", csv.text());
    for (line, row) in lines.iter().zip(rows) {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells[0], row["at"].as_str().unwrap());
        assert_eq!(cells[1], row["key_id"].as_str().unwrap());
        assert_eq!(cells[10], row["cost_usd"].as_str().unwrap());
    }

    // Dates picked in the form (whole UTC days, both included): yesterday
    // to today holds the call, and its CSV is /v1/usage for that span; a
    // day long ago holds nothing.
    let days = b
        .js("var d = new Date(); var y = new Date(d.getTime() - 86400000); return [y.toISOString().slice(0, 10), d.toISOString().slice(0, 10)];")
        .await;
    let (yesterday, today) = (days[0].as_str().unwrap(), days[1].as_str().unwrap());
    b.js(&format!(
        "document.getElementById('u-from').value = '{yesterday}'; document.getElementById('u-to').value = '{today}';"
    ))
    .await;
    b.click("form.filters button[type=submit]").await;
    wait_url(&b, &format!("to={today}&bucket=hour")).await;
    assert!(
        b.source().await.contains(&id),
        "the call is inside the dates"
    );
    let href = b
        .js("return document.querySelector('a[download]').getAttribute('href');")
        .await;
    let href = href.as_str().unwrap().replace("&amp;", "&");
    let span = href.split_once("since=").unwrap().1;
    assert!(span.contains("&until="), "{href}");
    let csv = send(
        addr,
        Req::new("GET", &href).header("cookie", &format!("vg_session={session}")),
    )
    .await;
    let api = support::get(addr, &format!("/v1/usage?since={span}&limit=10000"), &admin)
        .await
        .json();
    assert_eq!(
        csv.text().lines().count() - 1,
        api["data"].as_array().unwrap().len(),
        "{}",
        csv.text()
    );
    assert!(csv.text().contains(&id));
    b.goto(&format!("{base}/ui/usage?from=2020-01-01&to=2020-01-01"))
        .await;
    let empty = b.source().await;
    assert!(
        !empty.contains(&format!("/ui/keys/{id}")),
        "nothing on a day long ago"
    );
    b.goto(&format!("{base}/ui/usage?from=2020-01-02&to=2020-01-01"))
        .await;
    wait_text(&b, "to: must not be before from").await;

    // Revoke in the UI: the next proxied call is 401 within 1 s.
    // Its sub-agent key goes with it, and the confirmation says so.
    let (_, child, _) = create_key(addr, &admin, &json!({"name": "sub-agent", "parent": id})).await;
    b.goto(&format!("{base}/ui/keys/{id}")).await;
    wait_text(&b, "sub-agent").await;
    b.shot("key-detail").await;
    b.click("form[action$='/revoke'] button").await;
    wait_text(&b, "Revoke browser-made?").await;
    wait_text(&b, "1 sub-agent key is revoked with it.").await;
    b.click("form[action$='/revoke'] button").await;
    let revoked_at = Instant::now();
    wait_text(&b, "Revoked 2 key(s).").await;
    assert_eq!(chat(addr, &child, "gpt-4o-mini").await.status, 401);
    let r = chat(addr, &key, "gpt-4o-mini").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(revoked_at.elapsed() < Duration::from_secs(1));

    // Rotate: a new key; the old one works only during the grace period.
    let (rid, old, _) = create_key(addr, &admin, &json!({"name": "rotating", "env": "test"})).await;
    b.goto(&format!("{base}/ui/keys/{rid}")).await;
    b.js("document.getElementById('grace').value = '60s';")
        .await;
    b.click("form[action$='/rotate'] button").await;
    let new = shown_key(&b).await;
    assert_ne!(new, old);
    assert_eq!(chat(addr, &new, "gpt-4o-mini").await.status, 200);
    assert_eq!(
        chat(addr, &old, "gpt-4o-mini").await.status,
        200,
        "inside the grace period"
    );
    b.goto(&format!("{base}/ui/keys/{rid}")).await;
    b.click("form[action$='/rotate'] button").await;
    let newest = shown_key(&b).await;
    assert_eq!(
        chat(addr, &new, "gpt-4o-mini").await.status,
        401,
        "rotated without grace"
    );
    assert_eq!(chat(addr, &newest, "gpt-4o-mini").await.status, 200);

    // Add Provider Key: only the hint reaches the browser.
    let secret = "sk-dashboard-SECRET-0123456789abcdefXy7Q";
    b.goto(&format!("{base}/ui/vault")).await;
    b.js("document.getElementById('f-provider').value = 'openai';")
        .await;
    b.type_in("#f-name", "team openai").await;
    b.type_in("#f-api_key", secret).await;
    b.click("form[action='/ui/vault'] button").await;
    wait_text(&b, "team openai").await;
    let vault = b.source().await;
    assert!(
        vault.contains("sk-...y7Q") || vault.contains("sk-...Xy7Q"),
        "the hint is shown"
    );
    b.shot("vault").await;
    let mut seen = browser_state(&b).await;
    for page in ["/ui/keys", "/ui/vault", "/ui/audit"] {
        b.goto(&format!("{base}{page}")).await;
        seen.push_str(&browser_state(&b).await);
    }
    support::assert_absent(
        "the provider key in the browser",
        &seen,
        &support::encodings(secret),
    );

    // Create Proxy Key: a key that may use only that provider key.
    b.goto(&format!("{base}/ui/vault")).await;
    b.type_in("#f-proxy_name", "proxy-made").await;
    b.click("form[action='/ui/vault/proxy-key'] button").await;
    let proxy = shown_key(&b).await;
    let pks = support::get(addr, "/v1/provider-keys", &admin).await.json();
    let pk = pks["data"][0]["id"].as_str().unwrap().to_owned();
    let keys = support::get(addr, "/v1/keys", &admin).await.json();
    let made = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "proxy-made")
        .unwrap()
        .clone();
    assert_eq!(made["provider_keys"], json!([pk]));
    let other = send(
        addr,
        Req::new("POST", "/anthropic/v1/messages")
            .header("x-api-key", &proxy)
            .json(&json!({"model": "claude-3-5-haiku-latest", "max_tokens": 5, "messages": []})),
    )
    .await;
    assert_eq!(other.status, 403, "another provider: {}", other.text());

    // Removing it first lists the keys limited to it, then removes it.
    b.goto(&format!("{base}/ui/vault")).await;
    b.click("form[action$='/remove'] button").await;
    wait_text(&b, "1 key is limited to it").await;
    assert!(b.source().await.contains("proxy-made"));
    b.click("form[action$='/remove'] button.danger").await;
    wait_text(&b, "No provider keys yet").await;
    let pks = support::get(addr, "/v1/provider-keys", &admin).await.json();
    assert_eq!(pks["data"], json!([]));

    // Hostile names render as text; no dialog fires; the CSP is there.
    for name in [
        "<img src=x onerror=alert(1)>",
        "\"><script>alert(1)</script>",
    ] {
        create_key(addr, &admin, &json!({"name": name})).await;
    }
    b.goto(&format!("{base}/ui/keys")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.alert_open().await, "a script ran");
    let text = b.js("return document.body.innerText;").await;
    let text = text.as_str().unwrap();
    assert!(text.contains("<img src=x onerror=alert(1)>"), "{text}");
    assert!(text.contains("\"><script>alert(1)</script>"), "{text}");
    assert_eq!(
        b.js("return document.querySelectorAll('img, main script').length;")
            .await,
        0
    );
    b.shot("hostile-names").await;
    let page = send(
        addr,
        Req::new("GET", "/ui/keys").header("cookie", &format!("vg_session={session}")),
    )
    .await;
    let csp = page.header("content-security-policy").unwrap_or_default();
    for part in [
        "script-src 'self'",
        "object-src 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(page.header("cache-control"), Some("no-store"));

    // The Policy YAML tab: an error names the line and field beside the
    // text; a valid file creates the key.
    b.goto(&format!("{base}/ui/keys/new")).await;
    b.click("details.yaml summary").await;
    b.type_in("#f-policy_yaml", "name: from-yaml\nbudget:\n  limit: 5\n")
        .await;
    b.click("details.yaml button.primary").await;
    wait_text(&b, "policy.yaml:3").await;
    assert_eq!(
        b.js("return document.getElementById('f-policy_yaml').getAttribute('aria-invalid');")
            .await,
        "true"
    );
    b.shot("policy-yaml-error").await;
    b.type_in(
        "#f-policy_yaml",
        "name: from-yaml\nmodels: [gpt-4o-mini]\nbudget:\n  limit_usd: 5\n",
    )
    .await;
    b.click("form:has(#f-policy_yaml) button.primary").await;
    assert!(shown_key(&b).await.starts_with("vpx_live_"));
    wait_text(&b, "from-yaml").await;

    // A cross-origin form post without the token is refused and changes nothing.
    let before = key_count(addr, &admin).await;
    for (origin, body) in [
        (Some("http://evil.example"), "name=forged".to_owned()),
        (Some("null"), "name=forged".to_owned()),
        (None, "name=forged".to_owned()),
        (Some(base.as_str()), "name=forged".to_owned()),
        (Some(base.as_str()), "name=forged&csrf=0000".to_owned()),
    ] {
        let r = forged_post(addr, "/ui/keys", &session, origin, &body).await;
        assert_eq!(r.status, 403, "{origin:?} {body}: {}", r.text());
    }
    assert_eq!(key_count(addr, &admin).await, before, "nothing was created");

    // Screens at 375 px: nothing wider than the window.
    b.resize(375, 800).await;
    b.goto(&format!("{base}/ui/keys")).await;
    let overflow = b
        .js("return document.documentElement.scrollWidth - window.innerWidth;")
        .await;
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "wider than 375 px by {overflow}"
    );
    b.shot("api-keys-375px").await;
    b.resize(1280, 900).await;

    // Sign out; the old cookie is refused afterwards.
    b.click("form[action='/ui/sign-out'] button").await;
    wait_url(&b, "/ui/sign-in").await;
    let r = send(
        addr,
        Req::new("GET", "/ui/keys").header("cookie", &format!("vg_session={session}")),
    )
    .await;
    assert_eq!(r.status, 303, "a signed-out cookie is refused");
    assert_eq!(r.header("location"), Some("/ui/sign-in"));

    // A chat:write key cannot sign in.
    let (chat_id, chat_only, _) = create_key(
        addr,
        &admin,
        &json!({"name": "agent", "permissions": ["chat:write"]}),
    )
    .await;
    sign_in(&b, &base, &chat_only).await;
    wait_text(&b, "can only make proxied calls").await;
    b.shot("sign-in-refused").await;
    // Audited where the key's project sees it, without the key.
    let audit = support::get(addr, "/v1/audit", &admin).await;
    let refused = audit.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["target"] == chat_id.as_str() && e["detail"]["route"] == "/ui/sign-in");
    assert!(refused, "{}", audit.text());
    support::assert_absent(
        "the refused key in the audit log",
        &audit.text(),
        &support::encodings(&chat_only),
    );

    // A project's key cannot see another project's keys.
    let other = cli(
        dir.path(),
        &[
            "keys",
            "create",
            "--name",
            "other-admin",
            "--scopes",
            "keys:manage,usage:read,audit:read",
            "--project",
            "other",
            "--output",
            "json",
        ],
    );
    assert_eq!(other.code, 0, "{other:?}");
    let other_key = other.json()["key"].as_str().unwrap().to_owned();
    sign_in(&b, &base, &other_key).await;
    wait_url(&b, "/ui/keys").await;
    assert!(
        !b.source().await.contains(&id),
        "another project's key is listed"
    );
    b.goto(&format!("{base}/ui/keys/{id}")).await;
    wait_text(&b, "Not allowed").await;
    b.shot("other-project-403").await;
    let s2 = session_cookie(&b).await;
    let r = send(
        addr,
        Req::new("GET", &format!("/ui/keys/{id}")).header("cookie", &format!("vg_session={s2}")),
    )
    .await;
    assert_eq!(r.status, 403);
    let r = forged_post(
        addr,
        &format!("/ui/keys/{id}/revoke"),
        &s2,
        Some(&base),
        &format!("confirm=yes&csrf={}", csrf_of(&r.text())),
    )
    .await;
    assert_eq!(r.status, 403, "nor act on it");
}

/// docs/dashboard.md#projects: an organisation-wide key (made by the
/// operator with `--project '*'`) switches between projects with the
/// header's **Project** select; each page then shows that project only,
/// and a key made from the form lands in it.
#[tokio::test]
async fn an_organisation_wide_key_switches_projects_in_the_browser() {
    let Some(b) = browser().await else { return };
    let dir = tempdir();
    let server = Server::start(dir.path());
    let base = server.url();
    let made = |args: &[&str]| {
        let mut all = vec!["keys", "create", "--output", "json"];
        all.extend_from_slice(args);
        let out = cli(dir.path(), &all);
        assert_eq!(out.code, 0, "{out:?}");
        let v = out.json();
        let text = |f: &str| v[f].as_str().unwrap().to_owned();
        (text("id"), text("key"))
    };
    let (_, org) = made(&["--name", "org-admin", "--scopes", "*", "--project", "*"]);
    let (search_id, _) = made(&["--name", "search-agent", "--project", "search", "--test"]);
    let (billing_id, _) = made(&["--name", "billing-agent", "--project", "billing", "--test"]);

    sign_in(&b, &base, &org).await;
    wait_url(&b, "/ui/keys").await;
    let all = b.source().await;
    assert!(all.contains("search-agent") && all.contains("billing-agent"));
    assert!(
        all.contains("every project"),
        "the header says what it sees"
    );

    b.js("document.getElementById('project-switch').value = 'search';")
        .await;
    b.click("form.switcher button[type=submit]").await;
    wait_text(&b, "<option value=\"search\" selected=\"\">search</option>").await;
    wait_url(&b, "/ui/keys").await;
    let src = b.source().await;
    assert!(
        src.contains("search-agent") && !src.contains("billing-agent"),
        "{src}"
    );
    b.shot("project-switcher").await;

    // The dialog's Project field defaults to the project being viewed.
    b.click("a[data-dialog=create-key]").await;
    let project = b
        .js("return document.querySelector('#create-key #f-project').value;")
        .await;
    assert_eq!(project, "search");
    b.type_in("#create-key #f-name", "made-in-search").await;
    b.js("document.querySelector('#create-key #f-env').value = 'test';")
        .await;
    b.click("#create-key button.primary").await;
    shown_key(&b).await;
    let listed = cli(dir.path(), &["keys", "list", "--output", "json"]).json();
    let made_in = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "made-in-search")
        .map(|k| k["project"].clone());
    assert_eq!(made_in, Some(json!("search")), "{listed}");

    // Audit follows the switch too.
    b.goto(&format!("{base}/ui/audit")).await;
    let audit = b.source().await;
    assert!(audit.contains(&search_id), "{audit}");
    assert!(
        !audit.contains(&billing_id),
        "another project's entries are hidden"
    );
}

/// Failed sign-ins: 429 after ten a minute from one address, each audited.
#[tokio::test]
async fn failed_sign_ins_are_rate_limited_and_audited() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let (addr, base) = (server.addr, server.url());
    let attempt = || async {
        send(
            addr,
            Req::new("POST", "/ui/sign-in")
                .header("origin", &base)
                .header("content-type", "application/x-www-form-urlencoded")
                .raw(b"api_key=vpx_live_AAAAAAAAAAAAAAAAAAAAAAAA".to_vec()),
        )
        .await
    };
    for _ in 0..10 {
        assert_eq!(attempt().await.status, 401);
    }
    assert_eq!(attempt().await.status, 429);
    // Refusals of unknown keys belong to no project: the operator sees them.
    let audit = cli(
        dir.path(),
        &["audit", "tail", "-n", "100", "--output", "json"],
    )
    .json();
    let refused = audit["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{audit}"))
        .iter()
        .filter(|e| e["kind"] == "request.denied" && e["detail"]["route"] == "/ui/sign-in")
        .count();
    assert_eq!(refused, 10);
    // The first load stays small: the sign-in page, its stylesheet and script.
    let mut total = 0;
    for p in ["/ui/sign-in", "/ui/assets/app.css", "/ui/assets/app.js"] {
        let r = send(addr, Req::new("GET", p)).await;
        assert_eq!(r.status, 200, "{p}");
        total += r.everything().len();
    }
    assert!(total < 200 * 1024, "{total} bytes");
}

/// `[ui] enabled = false` removes the routes: `/ui/…` is no page.
#[tokio::test]
async fn the_dashboard_can_be_turned_off() {
    let dir = tempdir();
    std::fs::write(dir.path().join("vaultgate.toml"), "[ui]\nenabled = false\n").unwrap();
    let server = Server::start(dir.path());
    for path in ["/ui/sign-in", "/ui/assets/app.js", "/"] {
        let r = send(server.addr, Req::new("GET", path)).await;
        assert_ne!(r.status, 200, "{path}");
        assert!(!r.text().contains("Sign in"), "{path}");
    }
}

/// A key revoked by another process (the CLI on the same data directory)
/// ends the dashboard sessions it opened within a second: the session
/// re-checks the key through the proxy's cache (0.9 s) on every request.
#[tokio::test]
async fn lifecycle_a_key_revoked_elsewhere_ends_its_session_within_a_second() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let (addr, base) = (server.addr, server.url());
    let (id, key, _) = create_key(
        addr,
        server.admin(),
        &json!({"name": "lead", "permissions": ["keys:manage"]}),
    )
    .await;
    let cookie = ui_sign_in(addr, &base, &key).await;
    let page = || async {
        send(addr, Req::new("GET", "/ui/keys").header("cookie", &cookie))
            .await
            .status
    };
    assert_eq!(page().await, 200, "signed in; the key is cached");
    let out = cli(dir.path(), &["keys", "revoke", &id]);
    assert_eq!(out.code, 0, "{out:?}");
    let took = support::poll_until(Duration::from_secs(1), || async { page().await == 303 }).await;
    assert!(
        took.is_some(),
        "the session outlived the revocation by a second"
    );
}

/// docs/dashboard.md#sessions: sessions live in the data directory's
/// database, so a restarted server keeps its browsers signed in (and
/// **Sign out** still ends them).
#[tokio::test]
async fn lifecycle_a_session_outlives_a_restart_of_the_server() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let cookie = ui_sign_in(server.addr, &server.url(), server.admin()).await;
    assert!(server.terminate(Duration::from_secs(30)).is_some());

    let server = Server::start(dir.path());
    let r = send(
        server.addr,
        Req::new("GET", "/ui/keys").header("cookie", &cookie),
    )
    .await;
    assert_eq!(r.status, 200, "signed out by a restart");
    let csrf = csrf_of(&r.text());
    let r = ui_form(
        server.addr,
        &server.url(),
        "/ui/sign-out",
        Some(&cookie),
        format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status, 303);
    let r = send(
        server.addr,
        Req::new("GET", "/ui/keys").header("cookie", &cookie),
    )
    .await;
    assert_eq!(r.status, 303, "signed out");
    // The database holds the session's hash, never the cookie's value.
    let id = cookie.trim_start_matches("vg_session=");
    for file in ["vaultgate.db", "vaultgate.db-wal"] {
        let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&bytes).contains(id), "{file}");
    }
}
