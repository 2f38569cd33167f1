//! Reload triggers: SIGHUP, and any change under the directories holding the config file, the
//! users file, the certificates and the CA files (client, backend, auth service and ACME CAs).
//!
//! Directories are watched, never files: editors save by rename and Kubernetes swaps a `..data`
//! symlink, and a watch on the old inode would go stale after the first save. For a file that is
//! a symlink, so is the directory of each link it leads through (certbot's `live/` and `archive/`). A watched directory
//! that is itself replaced (a deploy tool renaming a new `certs/` into place, or switching a
//! `current` symlink to another release) or missing is noticed by a check every 2 s of each
//! directory's inode, watched again under the new one and reloaded. Events are debounced; the
//! reload itself re-reads through symlinks and skips when no input file changed. A bad file is
//! logged and the running config stays; while it does, the same 2 s check retries the reload as
//! soon as what it failed on changes (a certificate in a directory only the new config names).
//!
//! Without inotify (the user's instances used up) the proxy still starts: every file is then
//! looked at on the same 2 s timer (identity, size, times), as are the files of a directory no
//! watch could be put on (the watch limit reached).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify_debouncer_full::notify::RecursiveMode;
use notify_debouncer_full::notify::event::{AccessKind, AccessMode, EventKind};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use tokio::sync::mpsc;

use crate::app::{App, Reloaded};

const DEBOUNCE: Duration = Duration::from_millis(200);
/// How soon a directory that could not be watched is looked for again.
const RETRY: Duration = Duration::from_secs(2);
/// How often the generated self-signed certificate's end is looked at.
const SELF_SIGNED_CHECK: Duration = Duration::from_secs(3600);
/// After a reload that failed for a reason outside its files (a port another process holds:
/// `StartError::is_transient`), it is tried again after this, doubling up to
/// `RUNTIME_RETRY_MAX`: the port may be let go without any file changing.
const RUNTIME_RETRY: Duration = Duration::from_secs(10);
const RUNTIME_RETRY_MAX: Duration = Duration::from_secs(300);

/// A watched directory's identity: a directory renamed into its place has another inode, and
/// the watch on the old one no longer sees the path's files.
type DirId = (u64, u64);

fn dir_id(dir: &Path) -> Option<DirId> {
    std::fs::metadata(dir).ok().filter(|m| m.is_dir()).map(|m| (m.dev(), m.ino()))
}

/// Start the watcher and the SIGHUP handler (`hup`, installed by the caller as early as it can);
/// both run until the process ends.
pub fn spawn(app: Arc<App>, hup: tokio::signal::unix::Signal) {
    spawn_with(app, hup, true)
}

/// `spawn`, with inotify or (`inotify` false, or none to be had) without: without, every file
/// is looked at on the 2 s timer instead.
fn spawn_with(app: Arc<App>, mut hup: tokio::signal::unix::Signal, inotify: bool) {
    let (tx, mut rx) = mpsc::channel::<bool>(16);
    let fs_tx = tx.clone();
    let debouncer = inotify.then(|| {
        new_debouncer(DEBOUNCE, None, move |res: DebounceEventResult| {
            if let Ok(events) = res
                && events.iter().any(|e| changes(&e.event.kind))
            {
                let _ = fs_tx.try_send(false);
            }
        })
    });
    let debouncer = match debouncer {
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            // The user's inotify instances used up (128 by default, shared by every process of
            // the UID: many containers under one UID on a node) must not stop the proxy.
            tracing::warn!(error = %e, "cannot watch the config's files (inotify); looking at their sizes and times every 2 s instead (SIGHUP reloads too)");
            None
        }
        None => None,
    };
    let mut watches = Watches { debouncer, ids: HashMap::new(), missing: HashSet::new(), polled: None };
    watches.update(&app, true);
    let again = tx.clone();

    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let _ = tx.send(true).await;
        }
    });

    tokio::spawn(async move {
        let mut failed: Option<Failed> = None;
        // When to try a reload that failed for a runtime reason again, and the wait after that.
        let mut runtime_retry: Option<(tokio::time::Instant, Duration)> = None;
        let due =
            |r: &Option<(tokio::time::Instant, Duration)>| r.is_some_and(|(at, _)| at <= tokio::time::Instant::now());
        // The generated self-signed certificate is made anew at a reload in its last 30 days;
        // with no file changing, nothing else would reload a process that runs for a year.
        let mut self_signed_checked = tokio::time::Instant::now();
        loop {
            // The self-signed certificate's end is looked at on every pass, whatever woke it: a
            // directory with a file that changes every second would otherwise keep the timer
            // below from ever running out.
            let mut renew = false;
            if self_signed_checked.elapsed() >= SELF_SIGNED_CHECK {
                self_signed_checked = tokio::time::Instant::now();
                renew = app.self_signed_ending();
                if renew {
                    tracing::info!("the self-signed certificate ends within 30 days: reloading to make a new one");
                }
            }
            // A directory that is missing, or was replaced without an event reaching its old
            // watch (a symlink switched to another directory), is found by the timer; reload
            // then, as its files may have changed unseen. So is a change to what the last failed
            // reload failed on: its files may be in directories only the new config names,
            // which no watch covers yet.
            let mut force = match tokio::time::timeout(RETRY, rx.recv()).await {
                Ok(Some(force)) => force,
                Ok(None) => break,
                Err(_) if watches.update(&app, false) => false,
                Err(_) if failed.is_some() && failed != Some(Failed::now(&app).await) => false,
                Err(_) if renew => true,
                Err(_) if due(&runtime_retry) => true,
                Err(_) => continue,
            };
            // Due whatever woke this pass: events that the check below skips, coming more often
            // than the timer, must not put it off for ever.
            let retry_due = due(&runtime_retry);
            if retry_due {
                tracing::info!("trying the reload that could not bind again");
            }
            force |= renew || retry_due;
            // Coalesce a burst of events into one reload.
            while let Ok(f) = rx.try_recv() {
                force |= f;
            }
            // After a failed reload, an event that changed nothing it failed on (an editor's
            // swap file beside the config, another file in a busy directory) is not another
            // failed reload, error line and count; a SIGHUP always is.
            // What this reload is about to read, taken before it: a fix saved while it runs
            // then differs from it, and its event reloads again (taken after, the fix would
            // look like what failed, and be skipped).
            let reading = Failed::now(&app).await;
            if !force && failed.as_ref() == Some(&reading) {
                continue;
            }
            failed = None;
            // Doubling from one timed retry to the next; a reload an edit or SIGHUP brought about
            // starts again at the shortest wait.
            let wait = match runtime_retry.take() {
                Some((_, wait)) if retry_due => (wait * 2).min(RUNTIME_RETRY_MAX),
                _ => RUNTIME_RETRY,
            };
            match app.reload(force).await {
                Ok(Reloaded::Applied) => {
                    tracing::info!(config = %app.config_path().display(), "configuration reloaded")
                }
                Ok(Reloaded::Unchanged) => tracing::debug!("configuration files unchanged"),
                Ok(Reloaded::AcmeFailed(e)) => {
                    tracing::error!(error = %e, "configuration reloaded, but ACME could not be (re)started with it");
                    failed = Some(reading);
                }
                Ok(Reloaded::CertificatesKept(e)) => {
                    tracing::error!(error = %e, "configuration reloaded, but a certificate no longer loads: its previous one is served");
                    failed = Some(reading);
                }
                Err(e) if e.is_transient() => {
                    tracing::error!(error = %e, retry_in = ?wait, "configuration reload failed; keeping the running configuration");
                    failed = Some(reading);
                    runtime_retry = Some((tokio::time::Instant::now() + wait, wait));
                }
                Err(e) => {
                    tracing::error!(error = %e, "configuration reload failed; keeping the running configuration");
                    failed = Some(reading);
                }
            }
            // A directory replaced while the reload ran may hold files it did not read.
            if watches.update(&app, true) {
                let _ = again.try_send(false);
            }
        }
    });
}

/// Where a failed reload stands, looked at again on the timer: the config's error, or (a config
/// that loads but failed later, on a certificate say) the contents of every file it names.
/// Retried only when this changes, so a config that stays broken is not reloaded (and counted
/// as a failed reload) every few seconds.
#[derive(PartialEq)]
enum Failed {
    Load(String),
    Inputs(u64),
}

impl Failed {
    /// Off the runtime's threads: it reads and parses every file the config names.
    async fn now(app: &App) -> Failed {
        let path = app.config_path().to_path_buf();
        let look = move || match crate::config::Config::load(&path) {
            Err(e) => Failed::Load(e.to_string()),
            Ok(c) => Failed::Inputs(crate::app::fingerprint(&c.watched_files())),
        };
        tokio::task::spawn_blocking(look).await.unwrap_or_else(|e| Failed::Load(e.to_string()))
    }
}

struct Watches {
    /// None without inotify.
    debouncer: Option<
        notify_debouncer_full::Debouncer<
            notify_debouncer_full::notify::RecommendedWatcher,
            notify_debouncer_full::RecommendedCache,
        >,
    >,
    /// Watched directories and the inode each watch is on.
    ids: HashMap<PathBuf, DirId>,
    /// Directories that could not be watched (not there, say).
    missing: HashSet<PathBuf>,
    /// The last look at the files no watch covers (every file, without inotify).
    polled: Option<Vec<Option<FileStamp>>>,
}

/// What the timer compares for a file no watch covers: which file it is (a rename puts another
/// in its place), its size and its modification and change times (through symlinks).
type FileStamp = (u64, u64, u64, i64, i64, i64, i64);

fn stamp(file: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(file).ok()?;
    Some((m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
}

impl Watches {
    /// Watch every directory the running config reads from that is not yet watched under its
    /// current inode; with `refresh`, add every watch again too (notify drops a watch by itself
    /// when its directory is moved or deleted, and a directory moved back keeps its inode).
    /// Returns whether a directory that was missing or replaced is watched now, under an inode
    /// whose files no reload may have read yet.
    fn update(&mut self, app: &App, refresh: bool) -> bool {
        let mut files = app.runtime().config.watched_files();
        // The config file's own directory is always watched, even if the running config came
        // from elsewhere, so a fixed file is noticed.
        files.push(app.config_path().to_path_buf());
        let Some(debouncer) = &mut self.debouncer else {
            return self.poll(&files);
        };
        let dirs: HashSet<PathBuf> = files.iter().flat_map(|f| link_dirs(f)).collect();
        self.missing.retain(|d| dirs.contains(d));
        // Directories the config no longer reads from.
        let unused: Vec<PathBuf> = self.ids.keys().filter(|d| !dirs.contains(*d)).cloned().collect();
        for d in unused {
            let _ = debouncer.unwatch(&d);
            self.ids.remove(&d);
        }
        let mut found = false;
        for d in dirs {
            let id = dir_id(&d);
            let replaced = match self.ids.get(&d) {
                Some(old) if Some(*old) == id && !refresh => continue,
                Some(old) if Some(*old) == id => false,
                Some(_) => {
                    // Replaced or gone: the old watch follows the old inode.
                    let _ = debouncer.unwatch(&d);
                    self.ids.remove(&d);
                    true
                }
                None => false,
            };
            let watched = match id {
                Some(id) => match debouncer.watch(&d, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        self.ids.insert(d.clone(), id);
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                },
                None => Err("not a directory or not found".to_owned()),
            };
            match watched {
                Ok(()) => found |= self.missing.remove(&d) || replaced,
                Err(e) => {
                    if self.missing.insert(d.clone()) {
                        tracing::warn!(dir = %d.display(), error = %e, "cannot watch directory for changes; looking again every few seconds");
                    }
                }
            }
        }
        // Files in a directory no watch could be put on (inotify's watch limit reached, say)
        // are looked at like files without inotify.
        let unwatched: Vec<PathBuf> =
            files.into_iter().filter(|f| link_dirs(f).iter().any(|d| self.missing.contains(d))).collect();
        self.poll(&unwatched) || found
    }

    /// Whether any of `files` changed since the last look (not at the first).
    fn poll(&mut self, files: &[PathBuf]) -> bool {
        let now: Vec<Option<FileStamp>> = files.iter().map(|f| stamp(f)).collect();
        let changed = self.polled.as_ref().is_some_and(|before| *before != now);
        self.polled = Some(now);
        changed
    }
}

/// The directory of `file` and, where it is a symlink, of each link it leads through: certbot's
/// `live/NAME/fullchain.pem` links into `archive/NAME/`, and a renewal writes a new file there and
/// switches the link in `live/NAME/`, neither of which is the directory of a path such as
/// `/etc/portcullis/tls/fullchain.pem` that links to it.
fn link_dirs(file: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut p = file.to_path_buf();
    // Bounded, as the kernel bounds it: a loop of links ends here.
    for _ in 0..8 {
        let parent = p.parent().map(Path::to_path_buf);
        if let Some(parent) = &parent {
            dirs.push(dir_or_dot(parent));
        }
        match std::fs::read_link(&p) {
            // A relative target is relative to the link's directory; join keeps an absolute one.
            Ok(target) => p = parent.map_or(target.clone(), |d| d.join(&target)),
            Err(_) => break,
        }
    }
    dirs
}

/// A file's directory as an absolute path: notify keys its watches by absolute path, so `conf`
/// and `./conf` must not count as two directories (unwatching one would end the other's watch).
fn dir_or_dot(p: &Path) -> PathBuf {
    let p = if p.as_os_str().is_empty() { Path::new(".") } else { p };
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Whether an event can mean a changed file. inotify also reports opens and reads, and every
/// reload opens the files it reads: counting those made each reload trigger the next.
fn changes(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_inotify_a_changed_file_is_still_reloaded() {
        crate::tls::init_crypto();
        let dir = tempfile::tempdir().unwrap();
        // One digit changed: the same size, so only the file's times tell.
        let cfg = |errors: u32| {
            format!(
                "[auth]\nsource = \"backend\"\n[limits]\nmax_errors = {errors}\n[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nprotocol = \"imap\"\ntls = \"none\"\n[[backend]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n[backend.health]\nenabled = false\n[routing.imap]\ndefault = \"b\"\n"
            )
        };
        let path = dir.path().join("p.toml");
        std::fs::write(&path, cfg(3)).unwrap();
        let app = App::start(&path).await.unwrap();
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
        spawn_with(app.clone(), hup, false);
        // The watcher's first look, before the change.
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::fs::write(&path, cfg(7)).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while app.runtime().config.limits.max_errors != 7 {
            assert!(tokio::time::Instant::now() < deadline, "the changed file was not reloaded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        app.shutdown().await;
    }
    use notify_debouncer_full::notify::event::{CreateKind, ModifyKind, RemoveKind, RenameMode};

    #[test]
    fn opens_and_reads_are_not_changes() {
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Open(AccessMode::Read)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
        ] {
            assert!(!changes(&kind), "{kind:?}");
        }
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
        ] {
            assert!(changes(&kind), "{kind:?}");
        }
    }
}
