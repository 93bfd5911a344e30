//! Fills a vaultgate data directory with keys, for `bench/scale.sh`.
//!
//! Copies an existing key (made with `vaultgate keys create`, so its policy
//! went through the real API) until the store holds `TOTAL` keys
//! (`SqliteStore::copy_key_for_bench`: one SQL transaction). The first `HOT`
//! copies get keys made by the default `KeyFormat`, whose plaintexts are
//! written one per line to `KEYS_FILE` (mode 0600) for the load generator;
//! the rest get random hashes. Run it while no server has the store open.
//!
//! ```sh
//! cargo run --release -p vault-cli --example seed_keys -- DATA_DIR KEY_ID TOTAL HOT KEYS_FILE
//! ```

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail};
use vault_core::key::{KeyEnv, KeyFormat, KeyId};
use vault_core::store::{KeyStore, SqliteStore};

fn arg(args: &mut impl Iterator<Item = String>, name: &str) -> Result<String> {
    args.next().ok_or_else(|| {
        anyhow!("missing {name}; usage: seed_keys DATA_DIR KEY_ID TOTAL HOT KEYS_FILE")
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let data_dir = PathBuf::from(arg(&mut args, "DATA_DIR")?);
    let template = KeyId::parse(&arg(&mut args, "KEY_ID")?).context("KEY_ID is not a key id")?;
    let total: usize = arg(&mut args, "TOTAL")?.parse().context("TOTAL")?;
    let hot: usize = arg(&mut args, "HOT")?.parse().context("HOT")?;
    let keys_file = PathBuf::from(arg(&mut args, "KEYS_FILE")?);

    let started = Instant::now();
    let store = SqliteStore::open_in_dir(&data_dir)?;
    let existing = store.list_keys(None).await?.len();
    let Some(random) = total.checked_sub(existing + hot) else {
        bail!("the store already holds {existing} keys: TOTAL must be at least {existing} + HOT");
    };
    let format = KeyFormat::default();
    let keys = (0..hot)
        .map(|_| format.generate(KeyEnv::Live))
        .collect::<Result<Vec<_>, _>>()?;

    let mut out = std::fs::OpenOptions::new();
    out.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut out, 0o600);
    let out = out
        .open(&keys_file)
        .with_context(|| format!("creating {}", keys_file.display()))?;
    let mut out = std::io::BufWriter::new(out);
    for k in &keys {
        writeln!(out, "{}", k.expose_secret())?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;

    let known = keys.iter().map(|k| (k.hash(), k.prefix())).collect();
    let stored = store.copy_key_for_bench(&template, known, random).await?;
    eprintln!(
        "seed_keys: the store holds {stored} keys ({hot} with known plaintexts) after {:.1?}",
        started.elapsed()
    );
    Ok(())
}
