//! Settlements that could not reach the store (a commit, a release, an
//! in-doubt hold's longer lease), kept until they land: in memory and in
//! a local append-only file, so a restart of the node does not lose them.
//! The ledger retries them in the background ([`Journal::due`]).
//!
//! The file holds one JSON object per line: `{"add": N, ...}` when a
//! settlement is kept, `{"done": N}` when it landed. On start the file is
//! read back, what is not done is kept again, and the file is rewritten
//! with only that. Written with plain file I/O on a blocking thread: it
//! is only touched while the store is failing.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::vocab::{ReleaseReason, SkuKey, StoredResponse, TicketId};

/// Settlements kept at most; past this, new failures are only logged (the
/// holds' leases still return their units).
const MAX_PENDING: usize = 100_000;

/// A settlement that has not landed yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pending {
    /// Sell the ticket's units, keeping the backend's answer.
    Commit {
        /// Its stock.
        key: SkuKey,
        /// The ticket.
        ticket: TicketId,
        /// The answer to keep, if known.
        answer: Option<StoredResponse>,
    },
    /// Return the ticket's units.
    Release {
        /// Its stock.
        key: SkuKey,
        /// The ticket.
        ticket: TicketId,
        /// Why.
        reason: ReleaseReason,
    },
    /// Keep the units held for this long from when it lands.
    InDoubt {
        /// Its stock.
        key: SkuKey,
        /// The ticket.
        ticket: TicketId,
        /// The lease to set.
        lease: Duration,
    },
}

/// One line of the file.
#[derive(Default, Serialize, Deserialize)]
struct Line {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    add: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    done: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    op: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rule_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sku: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ticket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
}

impl Line {
    fn of(id: u64, p: &Pending) -> Self {
        let mut l = Line {
            add: Some(id),
            ..Line::default()
        };
        let (key, ticket) = match p {
            Pending::Commit {
                key,
                ticket,
                answer,
            } => {
                l.op = Some("commit".into());
                if let Some(a) = answer {
                    use base64::Engine as _;
                    l.status = Some(a.status);
                    l.content_type.clone_from(&a.content_type);
                    l.body = Some(base64::engine::general_purpose::STANDARD.encode(&a.body));
                }
                (key, ticket)
            }
            Pending::Release {
                key,
                ticket,
                reason,
            } => {
                l.op = Some("release".into());
                l.reason = Some(reason.as_str().into());
                (key, ticket)
            }
            Pending::InDoubt { key, ticket, lease } => {
                l.op = Some("in_doubt".into());
                l.lease_ms = Some(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX));
                (key, ticket)
            }
        };
        l.rule_name = Some(key.rule.to_string());
        l.sku = Some(key.sku.to_string());
        l.ticket = Some(ticket.to_string());
        l
    }

    fn pending(&self) -> Option<Pending> {
        let key = SkuKey::new(self.rule_name.as_deref()?, self.sku.as_deref()?);
        let ticket = TicketId::parse(self.ticket.as_deref()?)?;
        match self.op.as_deref()? {
            "commit" => {
                let answer = match (self.status, &self.body) {
                    (Some(status), Some(body)) => {
                        use base64::Engine as _;
                        let body = base64::engine::general_purpose::STANDARD
                            .decode(body)
                            .ok()?;
                        Some(StoredResponse {
                            status,
                            content_type: self.content_type.clone(),
                            body: body.into(),
                        })
                    }
                    _ => None,
                };
                Some(Pending::Commit {
                    key,
                    ticket,
                    answer,
                })
            }
            "release" => {
                let reason = ReleaseReason::ALL
                    .into_iter()
                    .find(|r| Some(r.as_str()) == self.reason.as_deref())?;
                Some(Pending::Release {
                    key,
                    ticket,
                    reason,
                })
            }
            "in_doubt" => Some(Pending::InDoubt {
                key,
                ticket,
                lease: Duration::from_millis(self.lease_ms?),
            }),
            _ => None,
        }
    }
}

/// The journal of one node.
pub struct Journal {
    file: Option<PathBuf>,
    /// The open lock file; this process writes the file while it holds
    /// the lock (`owned`).
    lock: Option<Arc<std::fs::File>>,
    owned: AtomicBool,
    state: Mutex<State>,
    /// Held across each change of the pending set and its line in the
    /// file, so the file says what the set says in the same order (a
    /// `done` never before its `add`, a file never removed under a new
    /// `add`).
    io: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    next: u64,
    pending: BTreeMap<u64, Pending>,
}

/// Appends lines to the file (created on first use, then its folder
/// synced so the new file itself survives a crash).
fn append(path: &Path, lines: &[Line]) -> std::io::Result<()> {
    let created = !path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut buf = Vec::new();
    for l in lines {
        serde_json::to_writer(&mut buf, l).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    f.write_all(&buf)?;
    // A settlement is only worth keeping if it survives a crash.
    f.sync_data()?;
    if created {
        sync_dir(path)?;
    }
    Ok(())
}

/// `<journal>.lock`, beside the journal.
fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Reads what the file holds pending and rewrites it with only that,
/// renumbered from 0 so the file does not grow across restarts.
fn take_over(path: &Path) -> std::io::Result<Vec<Pending>> {
    let mut pending = BTreeMap::new();
    match std::fs::File::open(path) {
        Ok(f) => {
            for line in std::io::BufReader::new(f).lines() {
                let Ok(l) = serde_json::from_str::<Line>(&line?) else {
                    // A line torn by a crash mid-write.
                    continue;
                };
                if let Some(done) = l.done {
                    pending.remove(&done);
                } else if let (Some(id), Some(p)) = (l.add, l.pending()) {
                    pending.insert(id, p);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let pending: Vec<Pending> = pending.into_values().collect();
    let lines: Vec<Line> = pending
        .iter()
        .enumerate()
        .map(|(i, p)| Line::of(i as u64, p))
        .collect();
    rewrite(path, &lines)?;
    Ok(pending)
}

/// Replaces the file with `lines` (removes it when there are none).
fn rewrite(path: &Path, lines: &[Line]) -> std::io::Result<()> {
    if lines.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let tmp = path.with_extension("journal.tmp");
    let _ = std::fs::remove_file(&tmp);
    append(&tmp, lines)?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Syncs the folder holding `path` (a created, renamed or removed entry).
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => std::fs::File::open(".")?.sync_all(),
    }
}

impl Journal {
    /// A journal kept only in memory (tests, tools).
    pub fn in_memory() -> Self {
        Self {
            file: None,
            lock: None,
            owned: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            io: tokio::sync::Mutex::new(()),
        }
    }

    /// The journal in `path`: what an earlier run left pending is read
    /// back and the file rewritten with only that. While another process
    /// holds the file (the gateway this one upgrades), settlements are
    /// kept in memory until [`Journal::adopt`] takes the file over.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let lock = Arc::new(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(lock_path(path))?,
        );
        let owned = match lock.try_lock() {
            Ok(()) => true,
            Err(std::fs::TryLockError::WouldBlock) => {
                tracing::warn!(file = %path.display(),
                    "another gateway holds the settlement journal (an upgrade?); \
                     settlements stay in memory until it exits");
                false
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        };
        let mut state = State::default();
        if owned {
            let pending = take_over(path)?;
            if !pending.is_empty() {
                tracing::warn!(pending = pending.len(), file = %path.display(),
                    "settlements from an earlier run are pending; retrying them");
            }
            for p in pending {
                state.pending.insert(state.next, p);
                state.next += 1;
            }
        }
        Ok(Self {
            file: Some(path.to_path_buf()),
            lock: Some(lock),
            owned: AtomicBool::new(owned),
            state: Mutex::new(state),
            io: tokio::sync::Mutex::new(()),
        })
    }

    /// Takes the file over once the process that held it has exited:
    /// what it left pending joins this process's pending set and the file
    /// is rewritten with all of it. Gives whether this process writes the
    /// file now.
    pub async fn adopt(&self) -> bool {
        if self.owned.load(Ordering::Acquire) {
            return true;
        }
        let (Some(path), Some(lock)) = (self.file.clone(), self.lock.clone()) else {
            return false;
        };
        let _io = self.io.lock().await;
        let taken = tokio::task::spawn_blocking(move || match lock.try_lock() {
            Ok(()) => take_over(&path).map(Some),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        })
        .await;
        let left = match taken {
            Ok(Ok(Some(left))) => left,
            Ok(Ok(None)) => return false,
            Ok(Err(e)) => {
                tracing::error!(file = ?self.file, error = %e, "cannot take the settlement journal over");
                return false;
            }
            Err(_) => return false,
        };
        let lines: Vec<Line> = {
            let Ok(mut s) = self.state.lock() else {
                return false;
            };
            for p in left {
                let id = s.next;
                s.next += 1;
                s.pending.insert(id, p);
            }
            s.pending.iter().map(|(id, p)| Line::of(*id, p)).collect()
        };
        let Some(path) = self.file.clone() else {
            return false;
        };
        let n = lines.len();
        let written = tokio::task::spawn_blocking(move || rewrite(&path, &lines)).await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::error!(file = ?self.file, "cannot write the settlement journal");
        }
        self.owned.store(true, Ordering::Release);
        tracing::info!(pending = n, file = ?self.file, "settlement journal taken over");
        true
    }

    /// Settlements waiting.
    pub fn len(&self) -> usize {
        self.state.lock().map_or(0, |s| s.pending.len())
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps a settlement that could not land.
    pub async fn add(&self, p: Pending) {
        let _io = self.io.lock().await;
        let id = {
            let Ok(mut s) = self.state.lock() else {
                return;
            };
            if s.pending.len() >= MAX_PENDING {
                tracing::error!(pending = s.pending.len(), settlement = ?p,
                    "settlement journal full; this one is dropped (its lease still returns its units)");
                return;
            }
            let id = s.next;
            s.next += 1;
            s.pending.insert(id, p.clone());
            id
        };
        self.write(vec![Line::of(id, &p)]).await;
    }

    /// What waits, with the ids to mark done.
    pub fn due(&self) -> Vec<(u64, Pending)> {
        self.state.lock().map_or_else(
            |_| Vec::new(),
            |s| s.pending.iter().map(|(id, p)| (*id, p.clone())).collect(),
        )
    }

    /// Marks settlements as landed.
    pub async fn done(&self, ids: &[u64]) {
        if ids.is_empty() {
            return;
        }
        let _io = self.io.lock().await;
        let empty = {
            let Ok(mut s) = self.state.lock() else {
                return;
            };
            for id in ids {
                s.pending.remove(id);
            }
            s.pending.is_empty()
        };
        let Some(path) = self
            .file
            .clone()
            .filter(|_| self.owned.load(Ordering::Acquire))
        else {
            return;
        };
        let lines: Vec<Line> = ids
            .iter()
            .map(|id| Line {
                done: Some(*id),
                ..Line::default()
            })
            .collect();
        let result = tokio::task::spawn_blocking(move || {
            if empty {
                // Nothing left: start the file afresh.
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    Err(_) => Ok(()),
                    Ok(()) => sync_dir(&path),
                }
            } else {
                append(&path, &lines)
            }
        })
        .await;
        if !matches!(result, Ok(Ok(()))) {
            tracing::warn!(file = ?self.file, "could not write the settlement journal");
        }
    }

    async fn write(&self, lines: Vec<Line>) {
        let Some(path) = self
            .file
            .clone()
            .filter(|_| self.owned.load(Ordering::Acquire))
        else {
            return;
        };
        let result = tokio::task::spawn_blocking(move || append(&path, &lines)).await;
        if !matches!(result, Ok(Ok(()))) {
            tracing::error!(file = ?self.file, "could not write the settlement journal; \
                the settlement is kept in memory only");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(n: u128) -> Pending {
        Pending::Commit {
            key: SkuKey::new("phone", "p1"),
            ticket: TicketId(n),
            answer: Some(StoredResponse {
                status: 201,
                content_type: Some("application/json".into()),
                body: bytes::Bytes::from_static(b"{\"order\":7}\x00"),
            }),
        }
    }

    #[tokio::test]
    async fn pending_settlements_survive_a_restart_and_done_ones_do_not() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("sluice.journal");
        let release = Pending::Release {
            key: SkuKey::new("phone", "p1"),
            ticket: TicketId(2),
            reason: ReleaseReason::Timeout,
        };
        let in_doubt = Pending::InDoubt {
            key: SkuKey::new("phone", "p2"),
            ticket: TicketId(3),
            lease: Duration::from_secs(600),
        };
        {
            let j = Journal::open(&path).expect("open");
            j.add(commit(1)).await;
            j.add(release.clone()).await;
            j.add(in_doubt.clone()).await;
            let first = j.due()[0].0;
            j.done(&[first]).await;
            assert_eq!(j.len(), 2);
        }
        let j = Journal::open(&path).expect("reopen");
        let due: Vec<Pending> = j.due().into_iter().map(|(_, p)| p).collect();
        assert_eq!(due, vec![release, in_doubt]);
        let ids: Vec<u64> = j.due().into_iter().map(|(id, _)| id).collect();
        j.done(&ids).await;
        assert!(j.is_empty());
        assert!(!path.exists(), "an empty journal leaves no file");
        drop(j);
        let j = Journal::open(&path).expect("reopen empty");
        assert!(j.is_empty());
    }

    #[tokio::test]
    async fn a_new_process_keeps_its_settlements_in_memory_until_the_old_one_lets_go() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("sluice.journal");
        let old = Journal::open(&path).expect("open");
        old.add(commit(1)).await;
        old.add(commit(2)).await;
        // The upgraded process opens the same journal while the old one runs.
        let new = Journal::open(&path).expect("open while held");
        assert!(new.is_empty(), "the old process's entries stay its own");
        new.add(commit(3)).await;
        assert!(!new.adopt().await, "held by the old process");
        let first = old.due()[0].0;
        old.done(&[first]).await;
        drop(old);
        assert!(new.adopt().await);
        let mut due: Vec<Pending> = new.due().into_iter().map(|(_, p)| p).collect();
        due.sort_by_key(|p| match p {
            Pending::Commit { ticket, .. } => ticket.0,
            _ => 0,
        });
        assert_eq!(due, vec![commit(2), commit(3)]);
        drop(new);
        let after = Journal::open(&path).expect("reopen");
        assert_eq!(
            after.len(),
            2,
            "the file holds both processes' pending settlements"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_adds_and_dones_leave_the_file_saying_what_is_pending() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("sluice.journal");
        let j = std::sync::Arc::new(Journal::open(&path).expect("open"));
        let mut tasks = Vec::new();
        for n in 0..40u128 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move {
                j.add(commit(n)).await;
                // Half land at once, racing the other adds.
                if n % 2 == 0 {
                    let ids: Vec<u64> = j
                        .due()
                        .into_iter()
                        .filter(|(_, p)| *p == commit(n))
                        .map(|(id, _)| id)
                        .collect();
                    j.done(&ids).await;
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        // The process ends (its lock with it) before the next one reads.
        drop(j);
        let mut want: Vec<Pending> = (0..40u128).filter(|n| n % 2 == 1).map(commit).collect();
        let mut got: Vec<Pending> = Journal::open(&path)
            .expect("reopen")
            .due()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        let order = |p: &Pending| match p {
            Pending::Commit { ticket, .. } => ticket.0,
            _ => u128::MAX,
        };
        want.sort_by_key(order);
        got.sort_by_key(order);
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("sluice.journal");
        {
            let j = Journal::open(&path).expect("open");
            j.add(commit(9)).await;
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("append");
        f.write_all(b"{\"add\":5,\"op\":\"comm").expect("write");
        drop(f);
        let j = Journal::open(&path).expect("reopen");
        assert_eq!(
            j.due().into_iter().map(|(_, p)| p).collect::<Vec<_>>(),
            vec![commit(9)]
        );
    }
}
