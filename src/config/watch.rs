//! Reload triggers: SIGHUP, and any change under the directories holding the config file, the
//! users file, the certificates and the CA files (client, backend and auth service CAs).
//!
//! Directories are watched, never files: editors save by rename and Kubernetes swaps a `..data`
//! symlink, and a watch on the old inode would go stale after the first save. Events are
//! debounced; the reload itself re-reads through symlinks and skips when no input file changed.
//! A bad file is logged and the running config stays.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify_debouncer_full::notify::RecursiveMode;
use notify_debouncer_full::notify::event::{AccessKind, AccessMode, EventKind};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use tokio::sync::mpsc;

use crate::app::{App, Reloaded};

const DEBOUNCE: Duration = Duration::from_millis(200);

/// Start the watcher and the SIGHUP handler (`hup`, installed by the caller as early as it can);
/// both run until the process ends.
pub fn spawn(app: Arc<App>, mut hup: tokio::signal::unix::Signal) -> Result<(), notify_debouncer_full::notify::Error> {
    let (tx, mut rx) = mpsc::channel::<bool>(16);
    let fs_tx = tx.clone();
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |res: DebounceEventResult| {
        if let Ok(events) = res
            && events.iter().any(|e| changes(&e.event.kind))
        {
            let _ = fs_tx.try_send(false);
        }
    })?;
    let mut watched: HashSet<PathBuf> = HashSet::new();
    watch_dirs(&app, &mut debouncer, &mut watched);

    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let _ = tx.send(true).await;
        }
    });

    tokio::spawn(async move {
        while let Some(mut force) = rx.recv().await {
            // Coalesce a burst of events into one reload.
            while let Ok(f) = rx.try_recv() {
                force |= f;
            }
            match app.reload(force).await {
                Ok(Reloaded::Applied) => {
                    tracing::info!(config = %app.config_path().display(), "configuration reloaded")
                }
                Ok(Reloaded::Unchanged) => tracing::debug!("configuration files unchanged"),
                Err(e) => tracing::error!(error = %e, "configuration reload failed; keeping the running configuration"),
            }
            watch_dirs(&app, &mut debouncer, &mut watched);
        }
    });
    Ok(())
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

fn watch_dirs(
    app: &App,
    debouncer: &mut notify_debouncer_full::Debouncer<
        notify_debouncer_full::notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
    watched: &mut HashSet<PathBuf>,
) {
    let mut dirs: HashSet<PathBuf> = app
        .runtime()
        .config
        .watched_files()
        .iter()
        .filter_map(|f| f.parent().map(|p| if p.as_os_str().is_empty() { PathBuf::from(".") } else { p.to_path_buf() }))
        .collect();
    // The config file's own directory is always watched, even if the running config came from
    // elsewhere, so a fixed file is noticed.
    if let Some(p) = app.config_path().parent() {
        dirs.insert(if p.as_os_str().is_empty() { PathBuf::from(".") } else { p.to_path_buf() });
    }
    for d in &dirs {
        if !watched.contains(d) {
            match debouncer.watch(d, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(d.clone());
                }
                Err(e) => tracing::warn!(dir = %d.display(), error = %e, "cannot watch directory for changes"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
