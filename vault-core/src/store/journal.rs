//! The lease journal: what a [`LeasedStore`](super::LeasedStore) holds in
//! its leases, appended as it happens to a file only its process writes,
//! so that after a crash the leases are settled at what their calls spent
//! and hold, not in full (docs/threat-model.md: spend never passes the cap
//! and is never under-counted).
//!
//! One file per store, `<dir>/<owner>.<generation>.journal`, under an OS advisory lock
//! (`flock`) held for the process's life: a journal whose lock can be taken
//! belongs to a dead process. One line per event, one `write(2)` each, no
//! fsync (a killed process loses no page-cache write):
//!
//! ```text
//! L <lease> <key> <limit> <period> <amount>   lease taken (inner reservation)
//! H <hold> <lease> <amount>                   call reserved on a lease
//! S <hold> <actual>                           call settled
//! Q <hold> <actual> <keep>                    call settled in part
//! P <lease> <charged> <keep>                  lease's spend charged, rest kept
//! D <lease>                                   lease settled
//! ```
//!
//! Replaying gives, for each lease not settled, `spent + Σ open calls`
//! (spent: what settled calls cost less what was already charged): the
//! amount [`recover_lease_journals`] settles it at.
//!
//! A call's `H` is written before its reservation is returned (so before
//! the call can reach the provider), just after the hold is made and
//! outside its line's lock — replay keys holds by id, and a compaction
//! holds every line's lock, so its snapshot either has the hold or comes
//! after the write; `L`, `P`, `D` and `Q` are written under the line's lock; a batch of settled calls is
//! journaled in one write (`S` lines) just after the batch is applied. So
//! a crash between the two charges those calls what they held, not what
//! they cost (more, unless the provider billed past the reservation), and
//! an `S` may follow the `P` that already charged it (spent is signed).
//! `P` and `D` follow the store call they record: a crash between a
//! partial settlement and its `P` charges that spend twice (more, never
//! less); one before a `D` settles the lease again, a no-op. A line cut short at the
//! end (killed mid-write) is ignored; a journal with an unreadable line is
//! charged at least each lease's full amount (never under-counted).
//! [`Journal::compact`] starts a new generation holding just what is held
//! now, so a long-running process's journal stays small.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{KeyStore, StoreError};
use crate::clock::UnixMillis;
use crate::key::KeyId;
use crate::money::Micros;
use crate::record::{BudgetLine, Reservation, ReservationId, Settlement};

/// The name every journal ends with.
const SUFFIX: &str = ".journal";

/// One event in a journal (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(super) enum Record<'a> {
    /// A lease was taken: the inner store's reservation.
    Lease {
        id: u64,
        line: &'a BudgetLine,
        amount: Micros,
    },
    /// A call reserved `amount` on a lease.
    Hold { id: u64, lease: u64, amount: Micros },
    /// A call settled.
    Settled { id: u64, actual: Micros },
    /// A call settled in part, keeping `keep` held.
    HoldPart {
        id: u64,
        actual: Micros,
        keep: Micros,
    },
    /// A lease's spend so far was charged; it keeps holding `keep`.
    Charged {
        lease: u64,
        charged: Micros,
        keep: Micros,
    },
    /// A lease was settled.
    Done { lease: u64 },
}

impl Record<'_> {
    /// Appends the record as one line. Numbers are formatted with `itoa`:
    /// a call's hold is written on the request path, where `fmt`'s
    /// machinery cost more than the rest of the record.
    fn write_to(&self, out: &mut Vec<u8>) {
        fn field(out: &mut Vec<u8>, n: impl itoa::Integer) {
            out.push(b' ');
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        }
        match *self {
            Record::Lease { id, line, amount } => {
                out.push(b'L');
                field(out, id);
                out.push(b' ');
                out.extend_from_slice(line.key.as_str().as_bytes());
                field(out, line.limit.0);
                field(out, line.period_start.0);
                field(out, amount.0);
            }
            Record::Hold { id, lease, amount } => {
                out.push(b'H');
                field(out, id);
                field(out, lease);
                field(out, amount.0);
            }
            Record::Settled { id, actual } => {
                out.push(b'S');
                field(out, id);
                field(out, actual.0);
            }
            Record::HoldPart { id, actual, keep } => {
                out.push(b'Q');
                field(out, id);
                field(out, actual.0);
                field(out, keep.0);
            }
            Record::Charged {
                lease,
                charged,
                keep,
            } => {
                out.push(b'P');
                field(out, lease);
                field(out, charged.0);
                field(out, keep.0);
            }
            Record::Done { lease } => {
                out.push(b'D');
                field(out, lease);
            }
        }
        out.push(b'\n');
    }
}

/// This process's journal, locked for as long as it is open.
#[derive(Debug)]
pub(super) struct Journal {
    dir: PathBuf,
    /// Unique to this store: pid, time and a counter.
    owner: String,
    /// Read-locked by writers (appends to an `O_APPEND` file are atomic,
    /// so they need no queue of their own), write-locked to switch files.
    current: RwLock<Current>,
    /// Bytes written to the current file.
    written: AtomicU64,
}

/// The file being appended to: `<owner>.<generation>.journal`.
#[derive(Debug)]
struct Current {
    file: File,
    generation: u64,
}

fn io_error(what: &str, path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("lease journal: {what} {}: {e}", path.display()))
}

fn poisoned() -> StoreError {
    StoreError::Backend("lease journal lock poisoned".to_owned())
}

/// Formats records as journal lines.
fn format(records: &[Record<'_>]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(48 * records.len());
    for r in records {
        r.write_to(&mut buf);
    }
    buf
}

impl Journal {
    /// Creates and locks a new journal in `dir` (created, mode 0700 on unix,
    /// if missing).
    pub(super) fn create(dir: &Path) -> Result<Journal, StoreError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(dir)
            .map_err(|e| io_error("creating", dir, e))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let owner = format!(
            "{}-{nanos:x}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let file = Self::new_file(dir, &owner, 0, &[])?;
        Ok(Journal {
            dir: dir.to_owned(),
            owner,
            current: RwLock::new(Current {
                file,
                generation: 0,
            }),
            written: AtomicU64::new(0),
        })
    }

    /// Makes generation `generation` of `owner`'s journal holding `first`:
    /// written and locked under a temporary name first, so that no other
    /// process ever finds it unlocked or partly written.
    fn new_file(
        dir: &Path,
        owner: &str,
        generation: u64,
        first: &[u8],
    ) -> Result<File, StoreError> {
        let tmp = dir.join(format!("{owner}.{generation}.tmp"));
        let mut options = OpenOptions::new();
        options.create_new(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options
            .open(&tmp)
            .map_err(|e| io_error("creating", &tmp, e))?;
        file.try_lock().map_err(|e| io_error("locking", &tmp, e))?;
        file.write_all(first)
            .map_err(|e| io_error("writing", &tmp, e))?;
        let path = journal_path(dir, owner, generation);
        std::fs::rename(&tmp, &path).map_err(|e| io_error("naming", &path, e))?;
        Ok(file)
    }

    /// Bytes appended since the journal was created or last compacted.
    pub(super) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Appends records in one write.
    pub(super) fn write(&self, records: &[Record<'_>]) -> Result<(), StoreError> {
        let buf = format(records);
        let current = self.current.read().map_err(|_| poisoned())?;
        (&current.file).write_all(&buf).map_err(|e| {
            io_error(
                "writing",
                &journal_path(&self.dir, &self.owner, current.generation),
                e,
            )
        })?;
        self.written.fetch_add(
            u64::try_from(buf.len()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// Replaces the journal by a new generation holding only `snapshot`
    /// (the records that rebuild what is held now), then deletes the old
    /// one. The caller keeps every record from being written meanwhile.
    /// Recovery reads only an owner's newest generation, so a crash between
    /// the two steps loses nothing.
    pub(super) fn compact(&self, snapshot: &[Record<'_>]) -> Result<(), StoreError> {
        let buf = format(snapshot);
        let mut current = self.current.write().map_err(|_| poisoned())?;
        let generation = current.generation + 1;
        let file = Self::new_file(&self.dir, &self.owner, generation, &buf)?;
        let old = journal_path(&self.dir, &self.owner, current.generation);
        *current = Current { file, generation };
        self.written.store(
            u64::try_from(buf.len()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        std::fs::remove_file(&old).map_err(|e| io_error("removing", &old, e))
    }
}

fn journal_path(dir: &Path, owner: &str, generation: u64) -> PathBuf {
    dir.join(format!("{owner}.{generation}{SUFFIX}"))
}

/// A lease as replayed from a journal.
#[derive(Debug)]
struct Replayed {
    line: BudgetLine,
    amount: Micros,
    /// Settled calls' cost less what was charged (signed: a charge may be
    /// journaled before a call it covers is).
    spent: i128,
    done: bool,
}

/// What a journal says its unsettled leases owe: each lease's reservation
/// and the amount to settle it at, and how many lines could not be read.
pub(super) fn replay(text: &[u8]) -> (Vec<Settlement>, usize) {
    let mut leases: BTreeMap<u64, Replayed> = BTreeMap::new();
    // Open calls: id → (lease, amount held).
    let mut holds: HashMap<u64, (u64, Micros)> = HashMap::new();
    let mut corrupt = 0;
    // The part after the last newline was cut short: ignored.
    let whole = text
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(&text[..0], |end| &text[..end]);
    for raw in whole.split(|&b| b == b'\n').filter(|r| !r.is_empty()) {
        if apply(raw, &mut leases, &mut holds).is_none() {
            corrupt += 1;
        }
    }
    let mut open: HashMap<u64, Micros> = HashMap::new();
    for (lease, amount) in holds.values() {
        let o = open.entry(*lease).or_default();
        *o = o.saturating_add(*amount);
    }
    let owed = leases
        .into_iter()
        .filter(|(_, l)| !l.done)
        .map(|(id, l)| {
            let open = i128::from(open.get(&id).copied().unwrap_or_default().0);
            let owed = (l.spent + open).max(0);
            let mut actual = Micros(u64::try_from(owed).unwrap_or(u64::MAX));
            if corrupt > 0 {
                actual = actual.max(l.amount);
            }
            Settlement {
                reservation: Reservation {
                    id: ReservationId(id),
                    line: l.line,
                    amount: l.amount,
                },
                actual,
            }
        })
        .collect();
    (owed, corrupt)
}

/// Applies one line; `None` if it cannot be read.
fn apply(
    raw: &[u8],
    leases: &mut BTreeMap<u64, Replayed>,
    holds: &mut HashMap<u64, (u64, Micros)>,
) -> Option<()> {
    let line = std::str::from_utf8(raw).ok()?;
    let mut f = line.split(' ');
    let tag = f.next()?;
    let mut num = || f.next()?.parse::<u64>().ok();
    match tag {
        "L" => {
            let id = num()?;
            let key = KeyId::parse(line.split(' ').nth(2)?)?;
            let mut rest = line.split(' ').skip(3).map(|v| v.parse::<u64>().ok());
            let (limit, period, amount) = (rest.next()??, rest.next()??, rest.next()??);
            let line = BudgetLine {
                key,
                limit: Micros(limit),
                period_start: UnixMillis(i64::try_from(period).ok()?),
            };
            leases.insert(
                id,
                Replayed {
                    line,
                    amount: Micros(amount),
                    spent: 0,
                    done: false,
                },
            );
        }
        "H" => {
            let (id, lease, amount) = (num()?, num()?, num()?);
            leases.get(&lease)?;
            holds.insert(id, (lease, Micros(amount)));
        }
        "S" => {
            let (id, actual) = (num()?, num()?);
            if let Some((lease, _)) = holds.remove(&id)
                && let Some(l) = leases.get_mut(&lease)
            {
                l.spent += i128::from(actual);
            }
        }
        "Q" => {
            let (id, actual, keep) = (num()?, num()?, num()?);
            if let Some((lease, held)) = holds.get_mut(&id) {
                *held = (*held).min(Micros(keep));
                if let Some(l) = leases.get_mut(lease) {
                    l.spent += i128::from(actual);
                }
            }
        }
        "P" => {
            let (lease, charged, keep) = (num()?, num()?, num()?);
            let l = leases.get_mut(&lease)?;
            l.spent -= i128::from(charged);
            l.amount = Micros(keep);
        }
        "D" => {
            leases.get_mut(&num()?)?.done = true;
        }
        _ => return None,
    }
    Some(())
}

/// Settles, in `store`, the leases of every journal in `dir` whose owner is
/// dead (its lock can be taken) at what their calls spent and still hold,
/// then deletes those journals (of an owner's generations, only the newest
/// is read). A live store's own journal is locked, so never recovered.
/// Idempotent: settling a lease already settled (or swept) is a no-op.
/// Returns how many leases were settled. A missing `dir` has nothing.
pub async fn recover_lease_journals<S: KeyStore + ?Sized>(
    store: &S,
    dir: &Path,
) -> Result<usize, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_error("listing", dir, e)),
    };
    // Owner → (generation, file), newest last.
    let mut owners: BTreeMap<String, Vec<(u64, PathBuf)>> = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(|e| io_error("listing", dir, e))?.path();
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SUFFIX))
        else {
            continue;
        };
        let (owner, generation) = match stem.rsplit_once('.') {
            Some((o, g)) => (o.to_owned(), g.parse().unwrap_or(0)),
            None => (stem.to_owned(), 0),
        };
        owners.entry(owner).or_default().push((generation, path));
    }
    let mut settled = 0;
    for (_, mut files) in owners {
        files.sort();
        let Some((_, newest)) = files.pop() else {
            continue;
        };
        let Ok(mut file) = OpenOptions::new().read(true).open(&newest) else {
            continue; // deleted by another process recovering it
        };
        if file.try_lock().is_err() {
            continue; // its owner lives
        }
        let mut text = Vec::new();
        file.read_to_end(&mut text)
            .map_err(|e| io_error("reading", &newest, e))?;
        let (owed, corrupt) = replay(&text);
        if corrupt > 0 {
            tracing::warn!(
                journal = %newest.display(),
                unreadable_lines = corrupt,
                "lease journal is damaged: its leases are charged at least in full"
            );
        }
        if !owed.is_empty() {
            store.settle(&owed).await?;
        }
        settled += owed.len();
        tracing::info!(
            journal = %newest.display(),
            leases = owed.len(),
            "settled the leases of a process that died"
        );
        // Older generations first: the newest goes last, once nothing
        // stale is left to be read in its place.
        for (_, stale) in files {
            remove_if_present(&stale)?;
        }
        remove_if_present(&newest)?;
    }
    Ok(settled)
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("removing", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> BudgetLine {
        BudgetLine {
            key: KeyId::generate().unwrap(),
            limit: Micros(5_000_000),
            period_start: UnixMillis(0),
        }
    }

    fn journal(records: &[Record<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            r.write_to(&mut out);
        }
        out
    }

    #[test]
    fn lifecycle_replay_owes_spent_plus_open_calls() {
        let l = line();
        let text = journal(&[
            Record::Lease {
                id: 7,
                line: &l,
                amount: Micros(1_000),
            },
            Record::Hold {
                id: 1,
                lease: 7,
                amount: Micros(100),
            },
            Record::Hold {
                id: 2,
                lease: 7,
                amount: Micros(200),
            },
            Record::Settled {
                id: 1,
                actual: Micros(40),
            },
            Record::Charged {
                lease: 7,
                charged: Micros(40),
                keep: Micros(200),
            },
            Record::Hold {
                id: 3,
                lease: 7,
                amount: Micros(50),
            },
            Record::HoldPart {
                id: 3,
                actual: Micros(10),
                keep: Micros(20),
            },
            Record::Lease {
                id: 8,
                line: &l,
                amount: Micros(500),
            },
            Record::Done { lease: 8 },
        ]);
        let (owed, corrupt) = replay(&text);
        assert_eq!(corrupt, 0);
        assert_eq!(owed.len(), 1);
        assert_eq!(owed[0].reservation.id, ReservationId(7));
        // 10 spent since the charge, 200 + 20 still held by open calls.
        assert_eq!(owed[0].actual, Micros(230));
        assert_eq!(owed[0].reservation.line, l);
    }

    #[test]
    fn corruption_torn_last_line_is_ignored_bad_lines_charge_in_full() {
        let l = line();
        let mut text = journal(&[
            Record::Lease {
                id: 7,
                line: &l,
                amount: Micros(1_000),
            },
            Record::Hold {
                id: 1,
                lease: 7,
                amount: Micros(100),
            },
        ]);
        text.extend_from_slice(b"S 1 4");
        let (owed, corrupt) = replay(&text);
        assert_eq!((owed[0].actual, corrupt), (Micros(100), 0));
        text.extend_from_slice(b"\n\xffgarbage\n");
        let (owed, corrupt) = replay(&text);
        assert_eq!((owed[0].actual, corrupt), (Micros(1_000), 1));
    }
}
