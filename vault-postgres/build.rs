//! Sets `cfg(postgres_installed)` when `initdb` and `postgres` can be
//! found, so that the tests needing a server exist only where one can be
//! started; elsewhere one test prints `SKIPPED: …` (or, with `CI=true`,
//! fails). The same search as `testing::find_bin_dir`.

use std::path::Path;

fn has(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(postgres_installed)");
    println!("cargo::rerun-if-env-changed=PATH");
    // A directory that does not exist yet makes Cargo run this again on
    // every build, until PostgreSQL is installed.
    println!("cargo::rerun-if-changed=/usr/lib/postgresql");
    let on_path =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| has(&d)));
    let in_debian_dir = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| has(&e.path().join("bin")))
        })
        .unwrap_or(false);
    if on_path || in_debian_dir {
        println!("cargo::rustc-cfg=postgres_installed");
    }
}
